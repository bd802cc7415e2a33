"""Textual-inversion embeddings (Gal et al. 2022) in A1111's file formats.

An embedding is a few learned token vectors [n, width] with a name (its file's stem). Writing the name in a
prompt puts the vectors where the name's tokens would be. Files:
- .safetensors with `emb_params` [n, width] (A1111's current format);
- .pt / .bin with `string_to_param: {"*": [n, width]}` (A1111's older format) or `{"<token>": [width]}`
  (diffusers' learned_embeds.bin), read with torch.load(weights_only=True), which never runs pickled code;
- SDXL's: `clip_l` [n, 768] and `clip_g` [n, 1280], one set of vectors per text tower. As A1111 does, each
  tower takes its own (CLIP-L clip_l, bigG clip_g), and such an embedding fits a model whose towers together are
  as wide as both (SDXL base; the refiner's bigG alone skips it, as A1111's shape check does).
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
    vectors: torch.Tensor   # [n, width]; an SDXL embedding's clip_l columns, then its clip_g columns
    step: int | None = None
    clip_l: int = 0         # an SDXL embedding: how many columns are clip_l's (0: vectors for one text encoder)


SDXL_KEYS = ("clip_l", "clip_g")


def read_embedding(path: str | os.PathLike) -> Embedding:
    path = Path(path)
    if path.suffix == ".safetensors":
        source = read_tensors(path)
        step = source.metadata.get("step")
        step = int(step) if step and step.isdigit() else None
        if any(k in source.shapes for k in SDXL_KEYS):
            return _sdxl_embedding(path, {k: source.get(k) for k in SDXL_KEYS if k in source.shapes}, step)
        if "emb_params" not in source.shapes:
            keys = list(source.shapes)
            if len(keys) == 1:
                return Embedding(path.stem, _as_matrix(source.get(keys[0]), path))
            raise CheckpointError(f"{path.name} is not a textual-inversion embedding: no emb_params tensor "
                                  f"(keys: {', '.join(keys[:4])})")
        return Embedding(path.stem, _as_matrix(source.get("emb_params"), path), step)
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
    if isinstance(obj, dict) and any(k in obj for k in SDXL_KEYS):
        step = obj.get("step")
        return _sdxl_embedding(path, {k: obj[k] for k in SDXL_KEYS if k in obj}, step if isinstance(step, int) else None)
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), torch.Tensor):
        return Embedding(path.stem, _as_matrix(next(iter(obj.values())), path))
    raise CheckpointError(f"{path.name} is not a textual-inversion embedding (no emb_params / string_to_param)")


def _sdxl_embedding(path: Path, found: dict, step: int | None) -> Embedding:
    """An SDXL embedding: its clip_l and clip_g vectors side by side (in the order of the base model's towers)."""
    if len(found) != 2:
        missing = [k for k in SDXL_KEYS if k not in found]
        raise CheckpointError(f"{path.name} has {', '.join(found)} but not {', '.join(missing)}; an SDXL embedding "
                              "needs both clip_l and clip_g")
    clip_l, clip_g = (_as_matrix(found[k], path) for k in SDXL_KEYS)
    if clip_l.shape[0] != clip_g.shape[0]:
        raise CheckpointError(f"{path.name}: clip_l has {clip_l.shape[0]} vectors and clip_g {clip_g.shape[0]}; an SDXL "
                              "embedding needs as many of each")
    return Embedding(path.stem, torch.cat([clip_l, clip_g], dim=1), step, clip_l=clip_l.shape[1])


def _as_matrix(t, path: Path) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"{path.name}: embedding vectors must be a tensor, got {type(t).__name__}")
    if t.ndim == 1:
        t = t[None]
    if t.ndim != 2 or not t.is_floating_point() or t.shape[0] < 1:
        raise CheckpointError(f"{path.name}: embedding vectors must be a [n, width] float tensor, got {list(t.shape)}")
    return t.float()


def save_embedding(emb: Embedding, path: str | os.PathLike, checkpoint_name: str | None = None) -> Path:
    """A1111's .safetensors format (emb_params; an SDXL embedding's clip_l and clip_g), through a temporary file and
    a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"name": emb.name}
    if emb.step is not None:
        meta["step"] = str(emb.step)
    if checkpoint_name:
        meta["sd_checkpoint_name"] = checkpoint_name
    v = emb.vectors.detach().float()
    tensors = {"clip_l": v[:, :emb.clip_l], "clip_g": v[:, emb.clip_l:]} if emb.clip_l else {"emb_params": v}
    return write_safetensors({k: t.contiguous() for k, t in tensors.items()}, path, meta)


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
    for name, path in find_embeddings(folder).items():
        try:
            emb = read_embedding(path)
        except CheckpointError as e:
            skipped[name] = str(e)
            continue
        misfit = _misfit(emb, sd.config)
        if misfit:
            skipped[name] = misfit
        else:
            fitting.append(emb)
    out = EmbeddingSet(fitting, sd.tokenizer, text_width(sd.config), sd.config.text.vocab_size)
    out.skipped = skipped
    return out


def text_width(config) -> int:
    """How wide an embedding's vectors are for a model: its text towers' widths together (SDXL: CLIP-L's, then
    bigG's, A1111's expected shape)."""
    return config.text.width + (config.text2.width if config.text2 is not None else 0)


def _misfit(emb: Embedding, config) -> str | None:
    """Why an embedding does not fit a model's text towers (A1111 skips such embeddings), or None."""
    width = emb.vectors.shape[1]
    if config.text2 is not None:
        towers = (config.text.width, config.text2.width)
        if not emb.clip_l:
            return f"vectors of width {width} for one text encoder; this SDXL model takes clip_l and clip_g vectors"
        if (emb.clip_l, width - emb.clip_l) != towers:
            return (f"clip_l / clip_g vectors of widths {emb.clip_l} / {width - emb.clip_l}, this model's towers "
                    f"{towers[0]} / {towers[1]}")
        return None
    if emb.clip_l:
        return f"an SDXL embedding (clip_l and clip_g, {width} wide), this text encoder has width {config.text.width}"
    if width != config.text.width:
        return f"vectors of width {width}, this text encoder has {config.text.width}"
    return None
