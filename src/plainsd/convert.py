"""`plainsd convert`: a checkpoint from one layout or number format into another, checked.

In: an original single file (.safetensors, or .ckpt / .pt read with weights_only=True, its state_dict wrapper
unwrapped) or a diffusers folder. Out: one .safetensors file in the original layout (A1111, ComfyUI) or a
diffusers folder (diffusers' from_pretrained). As kohya's convert_diffusers20_original_sd.py decides, a path
with a suffix is a file and one without (or ending in "/") a folder.

The model goes through plainsd's own loader and writers, so the result holds the model only: EMA copies
(model_ema.*, unless --ema picks them instead of the live weights), optimizer states and other tensors are left
out. A single file's metadata is kept (in a diffusers folder: in the UNet's file). Then the check: the result is
loaded back and run on fixed inputs against the input, and only a result that passes replaces OUT.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch

from .models.sdxl import size_numbers, vector
from .weights import (SGM_TEXT_OPENCLIP, TEXT_OPENCLIP, CheckpointError, _component_file, _few, load,
                      original_state_dict, read_tensors, save, save_diffusers)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The check's limit per dtype of the result, on each output's largest difference as a fraction of its largest
# value: float32 keeps every weight (only the order of sums may differ); rounding the weights to float16 (11
# significant bits) or bfloat16 (8 bits) moves the outputs by small multiples of that rounding, while a
# misplaced tensor moves them by the size of the outputs themselves.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-1}
PROMPTS = ["a red circle on the left", "a photograph of an astronaut riding a horse on the moon"]


class CheckFailed(Exception):
    """The converted model's outputs differ from the input's by more than the tolerance."""

    def __init__(self, message: str, differences: dict[str, float]):
        super().__init__(message)
        self.differences = differences


@dataclasses.dataclass
class Converted:
    path: Path
    kind: str                      # "file" (original layout) or "diffusers" (a folder)
    dtype: torch.dtype
    left_out: list[str]            # the input's tensors the result does not hold (EMA copies, ...)
    differences: dict[str, float]  # the check's figures per output ({} without the check)
    tolerance: float | None

    def describe(self) -> str:
        """What was written, what was left out, and the check's figures, for the command line."""
        layout = "a single file in the original layout" if self.kind == "file" else "a diffusers folder"
        lines = [f"wrote {self.path} ({layout}, {_NAMES[self.dtype]})"]
        if self.left_out:
            lines.append(f"left out {len(self.left_out)} tensors that are not the model's: {_few(self.left_out)}")
        if self.tolerance is not None:
            lines.append(f"check passed: largest differences from the input, as fractions of each output's largest "
                         f"value: {_figures(self.differences)} (limit for {_NAMES[self.dtype]}: {self.tolerance:.0e})")
        else:
            lines.append("not checked (--no-check)")
        return "\n".join(lines)


def output_kind(output: str | os.PathLike) -> str:
    """"file" for a .safetensors path, "diffusers" for a folder (no suffix, a trailing "/" or an existing folder)."""
    text = os.fspath(output)
    path = Path(text)
    if text.endswith(("/", os.sep)) or path.is_dir() or not path.suffix:
        return "diffusers"
    if path.suffix == ".safetensors":
        return "file"
    raise ValueError(f"plainsd writes a .safetensors file or a diffusers folder (a path without a suffix), "
                     f"not {path.suffix}: {path.name}")


@dataclasses.dataclass
class _Input:
    keys: list[str]                # tensor names (a folder: its UNet's, diffusers' names)
    dtype: torch.dtype             # the UNet's weights'
    metadata: dict[str, str]


def _inspect(path: Path) -> _Input:
    """What the input holds besides what plainsd.load reads: its tensor names, the UNet's dtype, the metadata."""
    if path.is_dir():
        source = read_tensors(_component_file(path / "unet"))
        first = "conv_in.weight"
    elif path.exists():
        source = read_tensors(path)
        first = "model.diffusion_model.input_blocks.0.0.weight"
    else:
        raise CheckpointError(f"no such checkpoint file or folder: {path}")
    floats = [first] if first in source.shapes else list(source.shapes)[:1]
    dtype = source.get(floats[0]).dtype if floats else torch.float32
    return _Input(list(source.shapes), dtype if dtype in DTYPES.values() else torch.float32, dict(source.metadata))


def _temporary(out: Path, kind: str) -> Path:
    """A hidden sibling to write into (removed first if an interrupted run left it)."""
    tmp = out.with_name(f".{out.name}.converting" + (".safetensors" if kind == "file" else ""))
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    return tmp


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _put_in_place(tmp: Path, out: Path) -> None:
    """Rename the checked result to OUT; an existing OUT (--overwrite) is moved aside first and removed after."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.replaced")
    _remove(old)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(old, out)
        raise
    _remove(old)


def convert(input: str | os.PathLike, output: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
            check: bool = True, ema: bool = False, overwrite: bool = False) -> Converted:
    """Convert a checkpoint (see the module's docstring); returns what was written and the check's figures.

    dtype: "fp32", "fp16" or "bf16" (or a torch dtype); default: the input's (its UNet weights').
    check: load the result back and compare its outputs with the input's (CheckFailed if they differ by more
        than TOLERANCE; then nothing is written). ema: take the UNet's EMA weights (model_ema.*).
    overwrite: replace an existing OUT (only once the result has passed the check).
    """
    src, out = Path(input), Path(output)
    kind = output_kind(output)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose fp32, fp16 or bf16")
        dtype = DTYPES[dtype]
    if dtype is not None and dtype not in TOLERANCE:
        raise ValueError(f"plainsd converts to float32, float16 or bfloat16 weights, not {dtype}")
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists already; choose another name, or pass --overwrite to replace it")
    if not out.absolute().parent.is_dir():
        raise ValueError(f"cannot write {out}: the folder {out.absolute().parent} does not exist")
    info = _inspect(src)
    if ema and not any(k.startswith("model_ema.") for k in info.keys):
        raise CheckpointError(f"{src.name} has no EMA weights (model_ema.* tensors); convert it without --ema")
    dtype = dtype or info.dtype
    sd = load(src, ema=ema)
    model = set(original_state_dict(sd))
    # (Stability's sgm layout of SD 2.x, SD-Turbo's, has its text encoder under another prefix: renamed, not left out)
    renamed = {SGM_TEXT_OPENCLIP + k[len(TEXT_OPENCLIP):] for k in model if k.startswith(TEXT_OPENCLIP)}
    left_out = [k for k in info.keys if k not in model and k not in renamed] if src.is_file() else []
    reference, conditioning = probe(sd) if check else (None, None)
    sd.to(dtype)  # (tensor by tensor, in place: the writers then need no second copy of the weights)
    tmp = _temporary(out, kind)
    try:
        if kind == "file":
            save(sd, tmp, dtype=dtype, metadata=info.metadata)
        else:
            save_diffusers(sd, tmp, dtype=dtype, metadata=info.metadata)
        del sd
        differences = compare(reference, probe(load(tmp), conditioning)[0]) if check else {}
        worst = max(differences.values(), default=0.0)
        if check and not worst <= TOLERANCE[dtype]:
            raise CheckFailed(f"the converted model's outputs differ from {src.name}'s by up to {worst:.2e} of their "
                              f"size ({_figures(differences)}), more than the {TOLERANCE[dtype]:.0e} that "
                              f"{_NAMES[dtype]} allows; nothing was written", differences)
        _put_in_place(tmp, out)
    finally:
        _remove(tmp)
    return Converted(out, kind, dtype, left_out, differences,
                     TOLERANCE[dtype] if check else None)


_NAMES = {v: k for k, v in DTYPES.items()}


def _figures(differences: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.2e}" for name, value in differences.items())


@torch.no_grad()
def probe(sd, conditioning: tuple | None = None) -> tuple[dict[str, torch.Tensor], tuple]:
    """(outputs, conditioning) of a float32 model on fixed inputs: the text encoder's states (and SDXL's pooled
    text) for two prompts, a UNet call on seeded noise at two timesteps, a VAE decode of seeded latents.
    conditioning: the (states, SDXL vector) the UNet gets, the reference's, so that each network's difference is
    its own; default: this model's."""
    g = torch.Generator().manual_seed(0)
    c = sd.config
    ids = sd.tokenizer(PROMPTS)
    out = {}
    if c.sdxl:
        out["text encoder"], out["pooled text"] = sd.text_encoder.encode(ids)
        y = vector(out["pooled text"], torch.tensor([size_numbers(c.sdxl, 64, 64)] * len(PROMPTS)))
    else:
        out["text encoder"], y = sd.text_encoder(ids), None
    context, y = conditioning or (out["text encoder"], y)
    x = torch.randn(len(PROMPTS), c.unet.in_channels, 8, 8, generator=g)
    extra = {"y": y} if y is not None else {}
    if c.unet.time_cond_proj_dim > 0:
        extra["guidance"] = 4.0  # an LCM's guidance embedding takes part too
    out["unet"] = sd.unet(x, torch.tensor([999, 500]), context, **extra)
    out["vae decode"] = sd.vae.decode(torch.randn(1, c.vae.z_channels, 8, 8, generator=g))
    return out, (context, y)


def compare(reference: dict[str, torch.Tensor], result: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each output's largest difference as a fraction of its largest value. NaN or infinity where the input's
    output is finite counts as infinitely far (where the input's own output is not finite, the result's must not
    be either: a broken input stays broken, not broken differently)."""
    differences = {}
    for name, want in reference.items():
        got = result[name].float()
        finite = torch.isfinite(want)
        if got.shape != want.shape or not torch.equal(torch.isfinite(got), finite):
            differences[name] = float("inf")
            continue
        if not finite.any():
            differences[name] = 0.0
            continue
        scale = float(want[finite].abs().max()) or 1.0
        differences[name] = float((got - want)[finite].abs().max()) / scale
    return differences
