"""BERT's WordPiece tokenizer (uncased), as BLIP's captioner reads and writes text.

The steps of transformers' BertTokenizer: clean the text (drop control characters, map whitespace to spaces),
put spaces around CJK characters, lowercase and strip accents, split on whitespace and punctuation, then cut
each word into the longest pieces found in vocab.txt, later pieces marked "##" (a word that cannot be cut is
[UNK]). Decoding joins the pieces and applies BERT's clean-up of spaces before punctuation and contractions.
"""

from __future__ import annotations

import unicodedata

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_WORD_CHARS = 100  # longer words are [UNK] (BERT's max_input_chars_per_word)


def _is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_punctuation(ch: str) -> bool:
    """ASCII non-letters-or-digits count as punctuation too (BERT's rule: "$" and "^" split words)."""
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
                                             (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


def basic_words(text: str) -> list[str]:
    """Cleaned, lowercased, accent-free words and punctuation marks, in order."""
    chars = []
    for ch in text:
        if ord(ch) in (0, 0xFFFD) or _is_control(ch):
            continue
        if _is_cjk(ord(ch)):
            chars += [" ", ch, " "]
        else:
            chars.append(" " if _is_whitespace(ch) else ch)
    words = []
    for word in unicodedata.normalize("NFC", "".join(chars)).lower().split():
        word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
        current = ""
        for ch in word:
            if _is_punctuation(ch):
                words += [current, ch] if current else [ch]
                current = ""
            else:
                current += ch
        if current:
            words.append(current)
    return words


def clean_up_spaces(text: str) -> str:
    """BERT's clean-up after joining pieces with spaces: no space before . ? ! , and in English contractions."""
    for dirty, clean in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(dirty, clean)
    return text


class WordPieceTokenizer:
    """tokenizer.encode("a picture of") -> [1037, 3861, 1997]; tokenizer.decode(ids) -> "a picture of".

    vocab is the lines of vocab.txt, the id of a piece its line number. Ids past the end of it are the tokens a
    model added on top (BLIP's [DEC] and [ENC]); like the special tokens, decode leaves them out."""

    def __init__(self, vocab: list[str]):
        self.vocab = vocab
        self.ids = {piece: i for i, piece in enumerate(vocab)}
        if "[UNK]" not in self.ids:
            raise ValueError("a WordPiece vocabulary must hold the [UNK] piece")
        self.special_ids = {self.ids[t] for t in SPECIAL if t in self.ids}

    @classmethod
    def from_file(cls, path) -> "WordPieceTokenizer":
        with open(path, encoding="utf-8") as f:
            return cls([line.rstrip("\n") for line in f])

    def pieces(self, word: str) -> list[str]:
        """Greedy longest-match-first, as BERT: the whole word is [UNK] if any part of it is not in the vocabulary."""
        if len(word) > MAX_WORD_CHARS:
            return ["[UNK]"]
        out, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = ("##" if start else "") + word[start:end]
                if piece in self.ids:
                    break
                end -= 1
            if end == start:
                return ["[UNK]"]
            out.append(piece)
            start = end
        return out

    def encode(self, text: str) -> list[int]:
        """The ids of the text's pieces, without [CLS] / [SEP] around them."""
        return [self.ids[p] for word in basic_words(text) for p in self.pieces(word)]

    def decode(self, ids: list[int]) -> str:
        pieces = [self.vocab[i] for i in ids if i < len(self.vocab) and i not in self.special_ids]
        return clean_up_spaces(" ".join(pieces).replace(" ##", "").strip())
