"""Textual-inversion embeddings (Gal et al. 2022) in A1111's file formats.

An embedding is a few learned token vectors [n, width] with a name (its file's stem). Writing the name in a
prompt puts the vectors where the name's tokens would be. Files:
- .safetensors with `emb_params` [n, width] (A1111's current format);
- .pt / .bin with `string_to_param: {"*": [n, width]}` (A1111's older format) or `{"<token>": [width]}`
  (diffusers' learned_embeds.bin), read with torch.load(weights_only=True), which never runs pickled code.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from .weights import CheckpointError, read_tensors, write_safetensors

SUFFIXES = (".safetensors", ".pt", ".bin")


@dataclass
class Embedding:
    name: str
    vectors: torch.Tensor   # [n, width]
    step: int | None = None


def read_embedding(path: str | os.PathLike) -> Embedding:
    path = Path(path)
    if path.suffix == ".safetensors":
        source = read_tensors(path)
        if "emb_params" not in source.shapes:
            keys = list(source.shapes)
            if any(k in keys for k in ("clip_l", "clip_g")):
                raise CheckpointError(f"{path.name} is an SDXL embedding (clip_l/clip_g); plainsd runs SD 1.x and 2.x")
            if len(keys) == 1:
                return Embedding(path.stem, _as_matrix(source.get(keys[0]), path))
            raise CheckpointError(f"{path.name} is not a textual-inversion embedding: no emb_params tensor "
                                  f"(keys: {', '.join(keys[:4])})")
        step = source.metadata.get("step")
        return Embedding(path.stem, _as_matrix(source.get("emb_params"), path), int(step) if step and step.isdigit() else None)
    if not path.is_file():
        raise CheckpointError(f"no such embedding file: {path}")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path.name} holds pickled Python objects other than tensors; plainsd never runs "
                              f"pickled code: {str(e).splitlines()[0]}") from None
    except Exception as e:
        raise CheckpointError(f"{path.name} is not a readable embedding file: {e}") from None
    if isinstance(obj, dict) and isinstance(obj.get("string_to_param"), dict):
        params = obj["string_to_param"]
        if len(params) != 1:
            raise CheckpointError(f"{path.name}: expected one entry in string_to_param, found {len(params)}")
        step = obj.get("step")
        return Embedding(path.stem, _as_matrix(next(iter(params.values())), path), step if isinstance(step, int) else None)
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), torch.Tensor):
        return Embedding(path.stem, _as_matrix(next(iter(obj.values())), path))
    raise CheckpointError(f"{path.name} is not a textual-inversion embedding (no emb_params / string_to_param)")


def _as_matrix(t: torch.Tensor, path: Path) -> torch.Tensor:
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or not t.is_floating_point() or t.shape[0] < 1:
        raise CheckpointError(f"{path.name}: embedding vectors must be a [n, width] float tensor, got {list(t.shape)}")
    return t.float()


def save_embedding(emb: Embedding, path: str | os.PathLike, checkpoint_name: str | None = None) -> Path:
    """A1111's .safetensors format (emb_params), through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"name": emb.name}
    if emb.step is not None:
        meta["step"] = str(emb.step)
    if checkpoint_name:
        meta["sd_checkpoint_name"] = checkpoint_name
    return write_safetensors({"emb_params": emb.vectors.detach().float()}, path, meta)


class EmbeddingSet:
    """Embeddings usable in prompts: each name's token ids map to placeholder ids past the vocabulary,
    which the text encoder looks up in `vectors`."""

    def __init__(self, embeddings: list[Embedding], tokenizer, width: int, vocab_size: int):
        self.by_tokens: dict[tuple[int, ...], list[int]] = {}
        self.names: list[str] = []
        self.skipped: dict[str, str] = {}
        self.embeddings = {e.name: e for e in embeddings}
        rows, offset = [], vocab_size
        for emb in embeddings:
            if emb.vectors.shape[1] != width:
                raise CheckpointError(f"embedding {emb.name!r} has vectors of width {emb.vectors.shape[1]}, "
                                      f"this text encoder {width} (made for another model family?)")
            tokens = tuple(tokenizer.encode(emb.name))
            if not tokens:
                continue
            n = emb.vectors.shape[0]
            self.by_tokens[tokens] = list(range(offset, offset + n))
            self.names.append(emb.name)
            rows.append(emb.vectors)
            offset += n
        self.vectors = torch.cat(rows) if rows else torch.zeros(0, width)
        self.longest = max((len(t) for t in self.by_tokens), default=0)

    def match(self, tokens: list[int], i: int) -> tuple[list[int], int] | None:
        """(placeholder ids, tokens consumed) if an embedding's name starts at tokens[i]."""
        for length in range(min(self.longest, len(tokens) - i), 0, -1):
            ids = self.by_tokens.get(tuple(tokens[i: i + length]))
            if ids is not None:
                return ids, length
        return None


def find_embeddings(folder: str | os.PathLike) -> dict[str, Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"embeddings folder {folder} does not exist")
    found = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in SUFFIXES and not p.name.startswith("."):
            found.setdefault(p.stem, p)
    return found


def load_embeddings(folder: str | os.PathLike, sd) -> EmbeddingSet:
    """Every embedding in a folder that fits this model's text encoder (others are skipped, as A1111 does)."""
    fitting, skipped = [], {}
    width = sd.config.text.width
    for name, path in find_embeddings(folder).items():
        try:
            emb = read_embedding(path)
        except CheckpointError as e:
            skipped[name] = str(e)
            continue
        if sd.config.sdxl:  # (their clip_l / clip_g pairs: a later step)
            skipped[name] = "plainsd does not read SDXL embeddings yet"
        elif emb.vectors.shape[1] == width:
            fitting.append(emb)
        else:
            skipped[name] = f"vectors of width {emb.vectors.shape[1]}, this text encoder has {width}"
    out = EmbeddingSet(fitting, sd.tokenizer, width, sd.config.text.vocab_size)
    out.skipped = skipped
    return out
