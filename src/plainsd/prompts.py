"""Prompts as A1111 users write them: attention weights, long prompts in 75-token chunks, BREAK, prompt editing,
alternation and AND.

    (word)        weight x 1.1        ((word))   x 1.21
    (word:1.5)    explicit weight     [word]     / 1.1
    \\( \\) \\[ \\]   literal brackets    BREAK      start a new 75-token chunk
    [from:to:when]  `from` until step `when`, then `to` ([to:when] adds, [from::when] removes); a number
                    with a decimal point is a fraction of the steps (0.5 = half), without one a step number
    [a|b|c]       a different one each step, in turn
    a AND b:0.5   composable diffusion: each part guides on its own, with its weight (default 1)

A prompt becomes a schedule of (end_at_step, text) (prompt_schedule); each text is then weighted and chunked
as below.

Each chunk is encoded on its own as <start> 75 tokens <end>; the chunks' states are concatenated
along the token axis. Weights scale the token states, then the chunk is rescaled to its original mean
(A1111's "Original" emphasis).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

CHUNK = 75  # tokens per chunk between the start and end tokens
COMMA_BACKTRACK = 20  # a full chunk is cut after its last comma if that comma is this close to the end

_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_LORA = re.compile(r"<(lora|lyco|hypernet):([^:>]+)(?::([+-]?[.\d]+))?(?::[^>]*)?>")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """'a (red:1.3) [circle]' -> [('a ', 1.0), ('red', 1.3), (' ', 1.0), ('circle', 0.909...)].

    Unbalanced brackets are closed at the end, as A1111 does. BREAK becomes ('BREAK', -1).
    """
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float):
        for item in res[start:]:
            item[1] *= factor

    for m in _ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(res))
        elif piece == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply(round_open.pop(), float(weight))
        elif piece == ")" and round_open:
            multiply(round_open.pop(), 1.1)
        elif piece == "]" and square_open:
            multiply(square_open.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for start in round_open:
        multiply(start, 1.1)
    for start in square_open:
        multiply(start, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    merged: list[list] = [res[0]]
    for text_, w in res[1:]:
        if w == merged[-1][1] and w != -1:
            merged[-1][0] += text_
        else:
            merged.append([text_, w])
    return [(t, w) for t, w in merged]


# --- prompt editing and alternation (A1111's prompt_parser: get_learned_conditioning_prompt_schedules) ---------
# A1111 parses with a lark grammar; this is a small recursive-descent parser for the same language:
#   prompt     := (plain | (prompt) | (prompt:prompt) | [prompt] | edit | alternate)*
#   edit       := [prompt:prompt:NUMBER] | [prompt:NUMBER]       (whitespace allowed around NUMBER)
#   alternate  := [prompt|prompt|...]                            (options may be empty)
#   plain      := characters other than \ [ ] ( ) : |, or \ and any character (kept as written)
# At the top level a bracket or colon that opens nothing is plain text; a | outside an alternation or a lone \
# makes the whole prompt unparseable, and then it stays as written (as A1111's parser error does).

_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
_WHEN = re.compile(r"\s*([+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)\s*]")


@dataclass(frozen=True)
class _Edit:
    before: tuple | None     # None: [to:when]
    after: tuple
    when: str                # the number as written: a decimal point makes it a fraction


@dataclass(frozen=True)
class _Alternate:
    options: tuple


class _Parser:
    """Text -> a tuple of pieces: str (as written, brackets of weights included), _Edit, _Alternate."""

    def __init__(self, text: str):
        self.text = text
        self.groups: dict[int, tuple | None] = {}  # position of a bracket -> (pieces, end) or None

    def parse(self) -> tuple | None:
        pieces, i, text = [], 0, self.text
        while True:
            got, i = self.prompt(i)
            pieces += got
            if i == len(text):
                return tuple(pieces)
            if text[i] not in "[]():":
                return None  # | outside an alternation, or a lone backslash
            pieces.append(text[i])  # a bracket or colon that opens nothing
            i += 1

    def prompt(self, i: int) -> tuple[list, int]:
        """As many plain runs and bracketed groups as follow position i."""
        pieces, text = [], self.text
        while i < len(text):
            plain = _PLAIN.match(text, i)
            if plain:
                pieces.append(plain.group(0))
                i = plain.end()
                continue
            group = self.group(i) if text[i] in "([" else None
            if group is None:
                break
            pieces += group[0]
            i = group[1]
        return pieces, i

    def group(self, i: int):
        if i not in self.groups:
            self.groups[i] = self._round(i) if self.text[i] == "(" else self._square(i)
        return self.groups[i]

    def _round(self, i: int):
        """(prompt) or (prompt:prompt): weights, kept as text for parse_prompt_attention."""
        text = self.text
        inner, j = self.prompt(i + 1)
        if text[j:j + 1] == ")":
            return ["(", *inner, ")"], j + 1
        if text[j:j + 1] == ":":
            weight, k = self.prompt(j + 1)
            if text[k:k + 1] == ")":
                return ["(", *inner, ":", *weight, ")"], k + 1
        return None

    def _square(self, i: int):
        """[prompt] (a weight, kept as text), [a|b|...], [to:when] or [from:to:when]."""
        text = self.text
        first, j = self.prompt(i + 1)
        mark = text[j:j + 1]
        if mark == "]":
            return ["[", *first, "]"], j + 1
        if mark == "|":
            options = [tuple(first)]
            while text[j:j + 1] == "|":
                option, j = self.prompt(j + 1)
                options.append(tuple(option))
            return ([_Alternate(tuple(options))], j + 1) if text[j:j + 1] == "]" else None
        if mark == ":":
            when = _WHEN.match(text, j + 1)
            if when:
                return [_Edit(None, tuple(first), when.group(1))], when.end()
            second, k = self.prompt(j + 1)
            when = _WHEN.match(text, k + 1) if text[k:k + 1] == ":" else None
            if when:
                return [_Edit(tuple(first), tuple(second), when.group(1))], when.end()
        return None


def _end_step(when: str, steps: int, int_offset: int, fraction_offset: float) -> int:
    """The last step of an edit's first text. A1111's current rule ("old prompt editing timelines" off): a number
    with a decimal point is a fraction of the steps, one without a step number; in the hires fix's pass both count
    on from the first pass (1.5 = half of the hires steps, first pass steps + 5 = its fifth step)."""
    value = float(when)
    value = (value - fraction_offset) * steps if "." in when else value - int_offset
    return min(steps, int(value))


def _collect_ends(pieces, steps: int, offsets: tuple, ends: set) -> None:
    for piece in pieces:
        if isinstance(piece, _Edit):
            end = _end_step(piece.when, steps, *offsets)
            if end >= 1:
                ends.add(end)
            _collect_ends(piece.before or (), steps, offsets, ends)
            _collect_ends(piece.after, steps, offsets, ends)
        elif isinstance(piece, _Alternate):
            ends.update(range(1, steps + 1))
            for option in piece.options:
                _collect_ends(option, steps, offsets, ends)


def _text_at(pieces, step: int, steps: int, offsets: tuple) -> str:
    out = []
    for piece in pieces:
        if isinstance(piece, _Edit):
            chosen = (piece.before or ()) if step <= _end_step(piece.when, steps, *offsets) else piece.after
            out.append(_text_at(chosen, step, steps, offsets))
        elif isinstance(piece, _Alternate):
            out.append(_text_at(piece.options[(step - 1) % len(piece.options)], step, steps, offsets))
        else:
            out.append(piece)
    return "".join(out)


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """A prompt with editing and alternation -> [(end_at_step, text), ...]: a step uses the first entry whose
    end_at_step is at or after it. hires_steps: the schedule of the hires fix's pass, whose numbers continue
    the first pass's `steps`. 'a [b:3]' at 10 steps -> [(3, 'a '), (10, 'a b')]."""
    if hires_steps is None:
        total, offsets = steps, (0, 0.0)
    else:
        total, offsets = hires_steps, (steps, 1.0)
    try:
        pieces = _Parser(prompt).parse()
    except RecursionError:  # brackets nested hundreds deep: left as written, as any prompt that does not parse
        pieces = None
    if pieces is None:
        return [(total, prompt)]
    ends = {total}
    _collect_ends(pieces, total, offsets, ends)
    return [(end, _text_at(pieces, end, total, offsets)) for end in sorted(ends)]


_AND = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Composable diffusion (Liu et al. 2022) as A1111 writes it: 'a cat AND a dog:0.5' -> [('a cat', 1.0),
    (' a dog', 0.5)]. A trailing ':number' on any part is its weight, even without AND."""
    parts = []
    for part in _AND.split(prompt):
        text, weight = _PART_WEIGHT.search(part).groups()
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts


def check_prompt(prompt: str, what: str = "the prompt") -> None:
    """Refuse syntax plainsd would otherwise drop without a word: A1111's hypernetwork tags."""
    tags = [m.group(0) for m in _LORA.finditer(prompt) if m.group(1) == "hypernet"]
    if tags:
        raise ValueError(f"{what} asks for a hypernetwork ({tags[0]}), which plainsd does not load; remove the tag "
                         f"(LoRA files work: <lora:name:weight>)")


def extract_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Remove <lora:name:weight> tags from a prompt; return the prompt and the (name, weight) pairs."""
    found = [(m.group(2), float(m.group(3)) if m.group(3) else 1.0) for m in _LORA.finditer(prompt) if m.group(1) != "hypernet"]
    return _LORA.sub("", prompt), found


def tokenize_chunks(tokenizer, prompt: str, embeddings=None) -> list[tuple[list[int], list[float]]]:
    """The prompt as chunks of (77 token ids, 77 weights), each <start> 75 tokens <end>, padded.

    embeddings (an EmbeddingSet): names of textual-inversion embeddings become their placeholder ids,
    kept whole within one chunk."""
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1
    comma_id = tokenizer.encoder.get(",</w>")

    def close():
        nonlocal ids, weights, last_comma
        pad = CHUNK - len(ids)
        ids_ = [tokenizer.sot_id] + ids + [tokenizer.eot_id] * (pad + 1)
        # after the first end token, the pad id (0 for OpenCLIP): as a plain tokenizer call would give
        first_end = len(ids) + 1
        ids_ = ids_[: first_end + 1] + [tokenizer.pad_id] * (len(ids_) - first_end - 1)
        chunks.append((ids_, [1.0] + weights + [1.0] * (pad + 1)))
        ids, weights, last_comma = [], [], -1

    for text, weight in parse_prompt_attention(prompt):
        if weight == -1:  # BREAK
            close()
            continue
        tokens = tokenizer.encode(text)
        i = 0
        while i < len(tokens):
            found = embeddings.match(tokens, i) if embeddings is not None else None
            if found is not None:
                vector_ids, consumed = found
                if len(ids) + len(vector_ids) > CHUNK:
                    close()
                ids.extend(vector_ids[:CHUNK])
                weights.extend([weight] * len(vector_ids[:CHUNK]))
                i += consumed
                continue
            token = tokens[i]
            i += 1
            if token == comma_id:
                last_comma = len(ids)
            elif len(ids) == CHUNK and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                # The chunk is full: move the words after its last comma into the next chunk.
                cut = last_comma + 1
                rest_ids, rest_w = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = rest_ids, rest_w
            if len(ids) == CHUNK:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    return chunks


def encode_prompt(tokenizer, text_encoder, prompt: str, clip_skip: int | None = None, embeddings=None,
                  pooled: bool = False):
    """A prompt -> text states [1, 77 * chunks, width], with attention weights applied.

    pooled: also return the text encoder's pooled text [1, dim] (SDXL's), of the first chunk and unweighted, as
    A1111 takes it: (states, pooled)."""
    chunks = tokenize_chunks(tokenizer, prompt, embeddings)
    device = next(text_encoder.parameters()).device
    ids = torch.tensor([c[0] for c in chunks], device=device)
    w = torch.tensor([c[1] for c in chunks], device=device, dtype=torch.float32)
    with torch.no_grad():
        extra = embeddings.vectors.to(device) if embeddings is not None and len(embeddings.vectors) else None
        if pooled:
            z, first = text_encoder.encode(ids, clip_skip=clip_skip, extra=extra)
            first = first[:1].float()
        else:
            z = text_encoder(ids, clip_skip=clip_skip, extra=extra)
        z = z.float()  # [chunks, 77, width]
    if (w != 1).any():
        mean_before = z.mean(dim=(1, 2), keepdim=True)
        z = z * w[..., None]
        mean_after = z.mean(dim=(1, 2), keepdim=True)
        # A chunk whose mean is round-off next to its size (a final LayerNorm without bias gives that) keeps the
        # weighted states as they are: the ratio of two such means is noise, 0/0 a NaN.
        tiny = 1e-4 * z.abs().mean(dim=(1, 2), keepdim=True)
        defined = (mean_before.abs() > tiny) & (mean_after.abs() > tiny)
        z = z * torch.where(defined, mean_before / mean_after, torch.ones_like(mean_after))
    z = z.reshape(1, -1, z.shape[-1])
    return (z, first) if pooled else z


def encode_pair(tokenizer, text_encoder, prompts: list[str], negatives: list[str], clip_skip: int | None = None,
                embeddings=None):
    """Prompts and negative prompts -> (cond, uncond), padded with empty-prompt chunks to one length."""
    cond = [encode_prompt(tokenizer, text_encoder, p, clip_skip, embeddings) for p in prompts]
    uncond = [encode_prompt(tokenizer, text_encoder, n, clip_skip, embeddings) for n in negatives]
    longest = max(t.shape[1] for t in cond + uncond)
    empty = None
    padded = []
    for t in cond + uncond:
        if t.shape[1] < longest:
            if empty is None:
                empty = encode_prompt(tokenizer, text_encoder, "", clip_skip)
            t = torch.cat([t] + [empty] * ((longest - t.shape[1]) // empty.shape[1]), dim=1)
        padded.append(t)
    return torch.cat(padded[: len(cond)]), torch.cat(padded[len(cond):])
