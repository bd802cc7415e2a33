"""ControlNet units in a generation, as A1111's ControlNet extension (Mikubill/sd-webui-controlnet) drives them.

Model lookup (list_controlnets, find_controlnet): the shipped ControlNet and the files of a ControlNet folder,
by name. The rest (hints, the UNet wrapper) follows below.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# The shipped ControlNet, beside the shipped model
SHIPPED = Path(__file__).parent / "data" / "plainsd-base.controlnet-canny.safetensors"
# The file kinds the extension lists (global_state.CN_MODEL_EXTS, less .bin, which is a pickle of any kind)
CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")


def list_controlnets(folder: str | os.PathLike | None = None) -> dict[str, Path]:
    """name -> path: the shipped ControlNet (when present), then the ControlNet files and diffusers ControlNet
    folders (a config.json beside the weights) under folder, subfolders included. Names are file or folder stems,
    as the extension lists them before their "[hash]"; the first of two files with one stem wins."""
    found = {SHIPPED.name.removesuffix(".safetensors"): SHIPPED} if SHIPPED.is_file() else {}
    if folder is None:
        return found
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"ControlNet folder {folder} does not exist")
    for p in sorted(folder.rglob("*")):
        if p.name.startswith("."):
            continue
        if p.is_file() and p.suffix in CONTROLNET_SUFFIXES and not (p.parent / "config.json").is_file():
            found.setdefault(p.stem, p)
        elif p.is_dir() and (p / "config.json").is_file():
            found.setdefault(p.name, p)
    return found


def model_hash(path: str | os.PathLike) -> str:
    """A1111's short model hash, which the extension shows after each name: the first 8 hex digits of the SHA-256
    of the 64 KiB at offset 1 MiB (of a diffusers folder's weights file)."""
    path = Path(path)
    if path.is_dir():
        path = next((path / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
                     if (path / n).is_file()), path / "diffusion_pytorch_model.safetensors")
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def controlnet_titles(folder: str | os.PathLike | None = None) -> dict[str, Path]:
    """"name [hash]" -> path, the extension's model list (its /controlnet/model_list names)."""
    return {f"{name} [{model_hash(path)}]": path for name, path in list_controlnets(folder).items()}


def find_controlnet(model: str, folder: str | os.PathLike | None = None) -> Path:
    """The file (or diffusers folder) a unit's model names: a name from list_controlnets, with or without the
    extension's " [hash]" after it (any case), or a path."""
    available = list_controlnets(folder)
    name = model.rsplit(" [", 1)[0] if model.endswith("]") else model
    if name in available:
        return available[name]
    lower = {n.lower(): p for n, p in available.items()}
    if name.lower() in lower:
        return lower[name.lower()]
    if Path(model).exists():
        return Path(model)
    where = f"in {folder} or " if folder is not None else "(no ControlNet folder given) or "
    raise ValueError(f"no ControlNet named {model!r} {where}among the shipped ones; available: "
                     f"{', '.join(available) or 'none'} (or give a path)")


def check_combination(req, backend: str) -> None:
    """What ControlNet units cannot be combined with; filled in with the UNet wrapper below."""
