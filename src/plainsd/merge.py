"""The checkpoint merger, as A1111's (modules/extras.py, run_modelmerger).

Three ways to make model A from the models A, B and C, key by key:
- "Weighted sum": (1 - M) * A + M * B;
- "Add difference": A + M * (B - C), where a tensor C lacks counts as B's (its difference is zero);
- "No interpolation": A as it is (to bake in a VAE, halve, or drop tensors).
As in A1111, only tensors with "model" in their key are merged, and only where A and B both have them; A's
others stay as they are and B's others are left out. An inpainting (or instruct-pix2pix) model may be A with
an ordinary model as B: the first convolution's extra input channels stay A's. Then a VAE may be baked in
(it replaces A's first_stage_model.*), float32 tensors halved, and the tensors whose keys match a regular
expression dropped. The result's metadata carries A1111's merge recipe (sd_merge_recipe, sd_merge_models).

Where A1111 would fail in the middle or write a broken file (tensors of different shapes, models of different
kinds), plainsd refuses with one sentence before it writes anything.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .weights import (CheckpointError, TensorSource, file_sha256, legacy_hash, read_tensors, vae_tensors,
                      write_safetensors)

METHODS = {"weighted-sum": "Weighted sum", "add-difference": "Add difference", "none": "No interpolation"}
SKIP = ("cond_stage_model.transformer.text_model.embeddings.position_ids",)  # A1111's checkpoint_dict_skip_on_merge
VAE_PREFIX = "first_stage_model."


class Lazy(Mapping):
    """A file's tensors as a read-only mapping that reads each one when asked (a merge holds one at a time)."""

    def __init__(self, source: TensorSource):
        self.source = source

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.source.shapes:
            raise KeyError(key)
        return self.source.get(key)

    def __iter__(self):
        return iter(self.source.shapes)

    def __len__(self) -> int:
        return len(self.source.shapes)


@dataclass
class Merged:
    tensors: dict[str, torch.Tensor]
    inpainting: bool = False         # A's first convolution had 9 input channels, B's 4
    instruct_pix2pix: bool = False   # ... 8, B's 4
    left_out: int = 0                # B's tensors that A does not have


def method_name(method: str) -> str:
    """A1111's name of an interpolation method, from its own name or plainsd's (weighted-sum, add-difference, none)."""
    if method in METHODS.values():
        return method
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; methods: {', '.join(METHODS)}")
    return METHODS[method]


def merge(a: Mapping, b: Mapping | None = None, c: Mapping | None = None, *, method: str = "weighted-sum",
          multiplier: float = 0.3, half: bool = False, vae: Mapping | None = None, discard: str = "") -> Merged:
    """Merge state dicts (dicts of tensors, or Lazy files) as A1111 does; vae: a VAE's tensors without a prefix."""
    interp = method_name(method)
    need = {"Weighted sum": (True, False), "Add difference": (True, True), "No interpolation": (False, False)}[interp]
    for (needed, model), label in zip(zip(need, (b, c)), ("B", "C")):
        if needed and model is None:
            raise ValueError(f"{interp} needs a model {label}")
        if not needed and model is not None:
            raise ValueError(f"{interp} takes no model {label}; leave it out")
    pattern = _discard_pattern(discard)
    out = Merged({})
    if b is not None:
        _check_kinds(a, b, "B")
        if c is not None:
            _check_kinds(b, c, "C")
    for key in a:
        t = a[key]
        if b is not None and "model" in key and key in b and key not in SKIP and t.is_floating_point():
            t = _merge_one(key, t, b[key], c, interp, multiplier, out)
        out.tensors[key] = t
    out.left_out = 0 if b is None else sum(1 for key in b if "model" in key and key not in a)
    if vae is not None:
        _bake(out.tensors, vae)
    for key in list(out.tensors):
        if pattern is not None and pattern.search(key):
            del out.tensors[key]
        elif half and out.tensors[key].dtype == torch.float32:
            out.tensors[key] = out.tensors[key].half()
    return out


def _discard_pattern(discard: str):
    if not discard:
        return None
    try:
        return re.compile(discard)
    except re.error as e:
        raise ValueError(f"discard is not a regular expression ({e}): {discard!r}") from None


def _check_kinds(a: Mapping, b: Mapping, label: str) -> None:
    """Refuse models that share no merged tensor (B is another kind of file: a LoRA, a VAE, SDXL ...)."""
    if not any("model" in key and key in a for key in b):
        raise ValueError(f"model {label} has no tensor of A's (keys with 'model' in them, e.g. model.diffusion_model.*): "
                         f"it is another kind of file or another architecture")


def _merge_one(key: str, a: torch.Tensor, b: torch.Tensor, c: Mapping | None, interp: str, m: float,
               out: Merged) -> torch.Tensor:
    """One tensor of the merge (computed in float32, stored in A's dtype)."""
    if interp == "Add difference":
        if key in c:
            if tuple(c[key].shape) != tuple(b.shape):
                raise ValueError(f"B and C differ in {key}: {list(b.shape)} and {list(c[key].shape)}; "
                                 "they must be models of the same architecture")
            b = b.float() - c[key].float()
        else:
            b = torch.zeros_like(b, dtype=torch.float32)  # (A1111: a tensor C lacks adds nothing)

    def combine(x, y):
        if interp == "Weighted sum":
            return (1 - m) * x.float() + m * y.float()
        return x.float() + m * y.float()

    if a.shape == b.shape:
        return combine(a, b).to(a.dtype)
    same_but_inputs = a.ndim == 4 and b.ndim == 4 and a.shape[0] == b.shape[0] and a.shape[2:] == b.shape[2:]
    if same_but_inputs and b.shape[1] == 4 and a.shape[1] in (8, 9):
        merged = a.clone()
        merged[:, :4] = combine(a[:, :4], b).to(a.dtype)
        out.inpainting, out.instruct_pix2pix = out.inpainting or a.shape[1] == 9, out.instruct_pix2pix or a.shape[1] == 8
        return merged
    if same_but_inputs and a.shape[1] == 4 and b.shape[1] in (8, 9):
        kind = "inpainting" if b.shape[1] == 9 else "instruct-pix2pix"
        raise ValueError(f"to merge an {kind} model with an ordinary one, A must be the {kind} model")
    raise ValueError(f"A and B differ in {key}: {list(a.shape)} and {list(b.shape)}; they must be models of the "
                     "same architecture (A1111 merges an inpainting A with an ordinary B, not others)")


def _bake(tensors: dict[str, torch.Tensor], vae: Mapping) -> None:
    """Put the VAE's tensors in place of A's first_stage_model.* (shapes checked: A1111 would fail on load)."""
    keys = [VAE_PREFIX + k for k in vae]
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ValueError(f"the VAE does not fit model A: A has no {missing[0]} ({len(missing)} of its tensors missing)")
    for key in vae:
        t, want = vae[key], tensors[VAE_PREFIX + key].shape
        if t.numel() != want.numel():
            raise ValueError(f"the VAE does not fit model A: {key} is {list(t.shape)}, A's {list(want)}")
        tensors[VAE_PREFIX + key] = t.reshape(want)


# --- files ---------------------------------------------------------------------------------------------

def default_name(a: str | os.PathLike, b=None, c=None, method: str = "weighted-sum", multiplier: float = 0.3,
                 merged: Merged | None = None) -> str:
    """A1111's file name for a merge: "0.7(a) + 0.3(b)", "a + 0.3(b - c)" or "a", then .inpainting, .safetensors."""
    names = [Path(p).name.rsplit(".", 1)[0] if Path(p).is_file() else Path(p).name for p in (a, b, c) if p is not None]
    interp = method_name(method)
    if interp == "Weighted sum":
        name = f"{round(1 - multiplier, 2)}({names[0]}) + {round(multiplier, 2)}({names[1]})"
    elif interp == "Add difference":
        name = f"{names[0]} + {round(multiplier, 2)}({names[1]} - {names[2]})"
    else:
        name = names[0]
    if merged is not None:
        name += ".inpainting" * merged.inpainting + ".instruct-pix2pix" * merged.instruct_pix2pix
    return name + ".safetensors"


def recipe(paths: list, sources: list[TensorSource], method: str, multiplier: float, half: bool,
           custom_name: str, vae: str | None, discard: str, merged: Merged) -> dict[str, str]:
    """The metadata A1111 writes with a merge: the inputs' own metadata (A's, then B's, C's), "format", the merge
    recipe (sd_merge_recipe) and the models merged, with theirs (sd_merge_models, keyed by each file's SHA-256)."""
    metadata: dict[str, str] = {}
    for source in sources:
        metadata.update(source.metadata)
    metadata.update({k: v for k, v in sources[0].metadata.items() if k.startswith("plainsd.")})  # A's config
    metadata["format"] = "pt"
    hashes = [file_sha256(p) for p in paths]
    the_recipe = {"type": "webui", "primary_model_hash": hashes[0],
                  "secondary_model_hash": hashes[1] if len(hashes) > 1 else None,
                  "tertiary_model_hash": hashes[2] if len(hashes) > 2 else None,
                  "interp_method": method_name(method), "multiplier": multiplier, "save_as_half": half,
                  "custom_name": custom_name, "config_source": 0, "bake_in_vae": vae or "None",
                  "discard_weights": discard, "is_inpainting": merged.inpainting,
                  "is_instruct_pix2pix": merged.instruct_pix2pix}
    models: dict = {}
    for path, source, sha in zip(paths, sources, hashes):
        models[sha] = {"name": Path(path).name, "legacy_hash": legacy_hash(path),
                       "sd_merge_recipe": _json_or_none(source.metadata.get("sd_merge_recipe"))}
        models.update(_json_or_none(source.metadata.get("sd_merge_models")) or {})
    metadata["sd_merge_recipe"] = json.dumps(the_recipe)
    metadata["sd_merge_models"] = json.dumps(models)
    return metadata


def _json_or_none(text: str | None):
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


def merge_files(a, b=None, c=None, output=None, *, method: str = "weighted-sum", multiplier: float = 0.3,
                half: bool = False, vae=None, discard: str = "") -> Path:
    """Merge checkpoint files (.safetensors, or .ckpt read with weights_only) and write the result as .safetensors,
    whole or not at all. output: a file, or a folder for A1111's name (default: A's folder)."""
    paths = [Path(p) for p in (a, b, c) if p is not None]
    for p in paths:
        if not p.is_file():
            raise CheckpointError(f"no such checkpoint file: {p} (the merger reads single files; convert a "
                                  "diffusers folder first with plainsd convert)")
    sources = [read_tensors(p) for p in paths]
    lazy = [Lazy(s) for s in sources]
    baked = Lazy(vae_tensors(vae)[1]) if vae is not None else None
    merged = merge(lazy[0], lazy[1] if b is not None else None, lazy[2] if c is not None else None, method=method,
                   multiplier=multiplier, half=half, vae=baked, discard=discard)
    out = Path(output) if output is not None else paths[0].parent
    custom = ""
    if out.suffix == ".safetensors":
        custom = out.stem
    elif out.is_dir():
        out = out / default_name(a, b, c, method, multiplier, merged)
    else:
        raise ValueError(f"the merged checkpoint must be a .safetensors file or an existing folder, got {out}")
    metadata = recipe(paths, sources, method, multiplier, half, custom, Path(vae).name if vae else None, discard,
                      merged)
    write_safetensors(merged.tensors, out, metadata)
    return out
