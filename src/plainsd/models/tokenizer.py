"""CLIP's byte-level BPE tokenizer (Radford et al. 2021), as Stable Diffusion uses it.

Text is cleaned the way CLIP cleans it (a subset of ftfy's fixes, HTML entities, white space,
lower case), split into words by CLIP's pattern, each word's UTF-8 bytes mapped to printable
characters, and merged by the ranked BPE merges shipped in data/bpe_simple_vocab_16e6.txt.gz.

Two styles, as in the two Stable Diffusion generations:
- "sd1": transformers' CLIPTokenizer (OpenAI CLIP, SD 1.x): pads with <|endoftext|>.
- "sd2": open_clip's tokenizer (OpenCLIP, SD 2.x): pads with 0, also unescapes HTML twice.
"""

from __future__ import annotations

import functools
import gzip
import html
import os
import re
import unicodedata

import torch

BPE_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "bpe_simple_vocab_16e6.txt.gz")
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
STYLES = ("sd1", "sd2")


@functools.lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable character, keeping printable latin-1 bytes as themselves."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    # Order matters: the vocabulary lists these characters in this order (printable bytes first).
    mapping = {b: chr(b) for b in keep}
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + len(mapping) - len(keep))
    return mapping


# --- text clean-up: the parts of ftfy.fix_text (default settings) that change real prompts --------

_LIGATURES = {
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
    "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj",
    "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st",
}


def _build_translation() -> dict[int, str | None]:
    table: dict[int, str | None] = {ord(k): v for k, v in _LIGATURES.items()}
    # Full- and half-width forms become their ordinary forms; the ideographic space a space.
    table[0x3000] = " "
    for i in range(0xFF01, 0xFFF0):
        alt = unicodedata.normalize("NFKC", chr(i))
        if alt != chr(i):
            table[i] = alt
    # Curly quotes become straight ones.
    for i in [0x02BC, *range(0x2018, 0x201C)]:
        table[i] = "'"
    for i in range(0x201C, 0x2020):
        table[i] = '"'
    # Control characters nobody means to type (white-space controls are kept).
    for i in [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)]:
        table[i] = None
    return table


_TRANSLATION = _build_translation()
_HTML_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_ANSI_ESCAPE = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
_C1_CONTROL = re.compile(r"[\x80-\x9f]")
_WHITESPACE = re.compile(r"\s+")


def _c1_to_cp1252(match: re.Match) -> str:
    try:
        return bytes([ord(match.group(0))]).decode("cp1252")
    except UnicodeDecodeError:  # the five bytes cp1252 leaves undefined stay as they are
        return match.group(0)


def fix_text(text: str) -> str:
    """ftfy.fix_text's fixes, without its mojibake repair: entities, escapes, quotes, widths, NFC."""
    if "<" not in text:
        text = _HTML_ENTITY.sub(lambda m: html.unescape(m.group(0)), text)
    text = _ANSI_ESCAPE.sub("", text)
    text = _C1_CONTROL.sub(_c1_to_cp1252, text)
    text = text.translate(_TRANSLATION)
    text = text.replace("\r\n", "\n")
    return unicodedata.normalize("NFC", text)


def clean(text: str, style: str = "sd1") -> str:
    text = fix_text(text)
    if style == "sd2":
        text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


# --- splitting into words: CLIP's pattern without the third-party `regex` module ------------------
# <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+

_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def _kind(ch: str) -> str:
    if ch.isspace():
        return " "
    cat = unicodedata.category(ch)[0]
    return cat if cat in "LN" else "o"


def split_words(text: str) -> list[str]:
    words, i, n = [], 0, len(text)
    while i < n:
        for special in (SOT, EOT, *_CONTRACTIONS):
            if text.startswith(special, i):
                words.append(special)
                i += len(special)
                break
        else:
            kind = _kind(text[i])
            if kind == " ":
                i += 1
                continue
            j = i + 1
            if kind != "N":  # letters and "other" characters come in runs; digits one at a time
                while j < n and _kind(text[j]) == kind:
                    j += 1
            words.append(text[i:j])
            i = j
    return words


class Tokenizer:
    """`tokenizer(["a red circle"])` -> LongTensor [B, 77]: <|startoftext|> ids <|endoftext|> padding.

    Prompts longer than the context are truncated, keeping the final <|endoftext|>.
    """

    def __init__(self, style: str = "sd1", context_length: int = CONTEXT_LENGTH, bpe_path: str = BPE_PATH):
        if style not in STYLES:
            raise ValueError(f"unknown tokenizer style {style!r}; allowed: {', '.join(STYLES)}")
        self.style = style
        self.context_length = context_length
        with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # The first line is a version header; CLIP uses the first 48894 merges (49408 - 512 bytes - 2 specials).
        merges = [tuple(line.split()) for line in lines[1 : VOCAB_SIZE - 512 - 2 + 1]]
        byte_chars = list(bytes_to_unicode().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
        self.pad_id = self.eot_id if style == "sd1" else 0
        self._cache: dict[str, list[str]] = {SOT: [SOT], EOT: [EOT]}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, word: str) -> list[str]:
        """Merge a word's characters greedily by merge rank; the last symbol carries '</w>'."""
        if word in self._cache:
            return self._cache[word]
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        if len(self._cache) < 100_000:
            self._cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """Token ids of a text, without start/end tokens and without truncation."""
        ids = []
        for word in split_words(clean(text, self.style)):
            if word in (SOT, EOT):
                ids.append(self.encoder[word])
                continue
            chars = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(chars))
        return ids

    def decode(self, ids) -> str:
        specials = {self.sot_id, self.eot_id}
        text = "".join(self.decoder[int(i)] for i in ids if int(i) not in specials and int(i) in self.decoder)
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def pad(self, ids: list[int]) -> list[int]:
        """Wrap ids in start/end tokens, truncate to the context (keeping the end token) and pad."""
        ids = [self.sot_id] + list(ids) + [self.eot_id]
        if len(ids) > self.context_length:
            ids = ids[: self.context_length - 1] + [self.eot_id]
        return ids + [self.pad_id] * (self.context_length - len(ids))

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("the tokenizer takes a string or a list of strings")
        return torch.tensor([self.pad(self.encode(t)) for t in texts], dtype=torch.long)
