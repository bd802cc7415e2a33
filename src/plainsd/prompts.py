"""Prompts as A1111 users write them: attention weights, long prompts in 75-token chunks, BREAK.

    (word)        weight x 1.1        ((word))   x 1.21
    (word:1.5)    explicit weight     [word]     / 1.1
    \\( \\) \\[ \\]   literal brackets    BREAK      start a new 75-token chunk

Each chunk is encoded on its own as <start> 75 tokens <end>; the chunks' states are concatenated
along the token axis. Weights scale the token states, then the chunk is rescaled to its original mean
(A1111's "Original" emphasis).
"""

from __future__ import annotations

import re

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


def encode_prompt(tokenizer, text_encoder, prompt: str, clip_skip: int | None = None, embeddings=None) -> torch.Tensor:
    """A prompt -> text states [1, 77 * chunks, width], with attention weights applied."""
    chunks = tokenize_chunks(tokenizer, prompt, embeddings)
    device = next(text_encoder.parameters()).device
    ids = torch.tensor([c[0] for c in chunks], device=device)
    w = torch.tensor([c[1] for c in chunks], device=device, dtype=torch.float32)
    with torch.no_grad():
        extra = embeddings.vectors.to(device) if embeddings is not None and len(embeddings.vectors) else None
        z = text_encoder(ids, clip_skip=clip_skip, extra=extra).float()  # [chunks, 77, width]
    if (w != 1).any():
        mean_before = z.mean(dim=(1, 2), keepdim=True)
        z = z * w[..., None]
        mean_after = z.mean(dim=(1, 2), keepdim=True)
        # A chunk whose mean is round-off next to its size (a final LayerNorm without bias gives that) keeps the
        # weighted states as they are: the ratio of two such means is noise, 0/0 a NaN.
        tiny = 1e-4 * z.abs().mean(dim=(1, 2), keepdim=True)
        defined = (mean_before.abs() > tiny) & (mean_after.abs() > tiny)
        z = z * torch.where(defined, mean_before / mean_after, torch.ones_like(mean_after))
    return z.reshape(1, -1, z.shape[-1])


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
