"""Choosing a VAE as A1111 does (modules/sd_vae.py): its sd_vae setting, the VAE folder and the files it finds.

A1111 lists the VAEs by file name: every .safetensors / .pt / .ckpt under models/VAE (--vae-dir), and the
*.vae.safetensors / .vae.pt / .vae.ckpt files among the checkpoints. plainsd lists diffusers AutoencoderKL
folders too (by folder name). The setting is "Automatic" (a VAE whose file name starts with the checkpoint's
name, else the checkpoint's own), "None" (the checkpoint's own) or one of the names. A name that is not in the
list is refused here, where A1111 falls back to the checkpoint's own VAE with a line in its console.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

SUFFIXES = (".safetensors", ".pt", ".ckpt")
AUTOMATIC, NONE = "Automatic", "None"


def is_vae_file(path: Path) -> bool:
    """A1111's rule for a VAE among checkpoints: NAME.vae.safetensors (.pt, .ckpt)."""
    return path.suffix in SUFFIXES and path.stem.endswith(".vae")


def _is_vae_folder(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("_class_name") == "AutoencoderKL"
    except (OSError, ValueError, AttributeError):
        return False


def find_vaes(vae_dir: str | os.PathLike | None = None, models_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """name -> file (or diffusers folder): the VAE folder's files, then the *.vae.* files beside the checkpoints,
    in A1111's natural order (a name found twice: the first)."""
    found: list[tuple[str, Path]] = []
    if vae_dir is not None:
        vae_dir = Path(vae_dir)
        if not vae_dir.is_dir():
            raise ValueError(f"VAE folder {vae_dir} does not exist")
        for p in sorted(vae_dir.rglob("*")):
            if p.is_file() and p.suffix in SUFFIXES and not p.name.startswith("."):
                found.append((p.name, p))
            elif p.is_dir() and _is_vae_folder(p):
                found.append((p.name, p))
    if models_dir is not None and Path(models_dir).is_dir():
        found += [(p.name, p) for p in sorted(Path(models_dir).rglob("*")) if p.is_file() and is_vae_file(p)]
    return merge(found)


def beside(checkpoint: str | os.PathLike) -> dict[str, Path]:
    """name -> file: the *.vae.* files in a checkpoint's folder, not its subfolders (the command line's stand-in for
    A1111's models folder, whose *.vae.* files it lists among its VAEs)."""
    folder = Path(checkpoint).parent
    if not folder.is_dir():
        return {}
    return merge([(p.name, p) for p in folder.iterdir() if p.is_file() and is_vae_file(p)])


def merge(*lists) -> dict[str, Path]:
    """Lists of VAEs (dicts name -> file, or (name, file) pairs) as one, in A1111's natural order; a name found
    twice: the first."""
    pairs = [pair for found in lists for pair in (found.items() if isinstance(found, dict) else found)]
    out: dict[str, Path] = {}
    for name, path in sorted(pairs, key=lambda item: _natural(item[0])):
        out.setdefault(name, path)
    return out


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def resolve(setting: str | None, checkpoint: str | os.PathLike | None, available: dict[str, Path]) -> Path | None:
    """The VAE file the sd_vae setting asks for with this checkpoint; None: the checkpoint's own VAE."""
    setting = AUTOMATIC if setting in (None, "", "auto") else setting
    if setting == NONE:
        return None
    if setting == AUTOMATIC:
        if checkpoint is None:
            return None
        stem = Path(checkpoint).name.rsplit(".", 1)[0] if Path(checkpoint).is_file() else Path(checkpoint).name
        near = [path for name, path in available.items() if name.startswith(stem)]
        return near[0] if near else None
    if setting not in available:
        names = ", ".join([AUTOMATIC, NONE, *available])
        raise ValueError(f"unknown VAE {setting!r}; sd_vae takes {names}")
    return available[setting]


def find_setting(name: str, available: dict[str, Path]) -> str:
    """The sd_vae setting a name the user typed stands for, as A1111's X/Y/Z plot reads a VAE axis' values:
    "auto" or "automatic" and "none" in any case, else the shortest listed name containing it (ignoring case).
    A name that matches none is refused (A1111 falls back to Automatic)."""
    wanted = name.strip().lower()
    if wanted in ("auto", AUTOMATIC.lower()):
        return AUTOMATIC
    if wanted == NONE.lower():
        return NONE
    matches = sorted((n for n in available if wanted and wanted in n.lower()), key=len)
    if not matches:
        raise ValueError(f"no VAE is named like {name!r}; there are {', '.join([AUTOMATIC, NONE, *available])}")
    return matches[0]


def check_setting(setting, available: dict[str, Path]) -> None:
    """Refuse an sd_vae value that names no VAE (one sentence listing what it takes)."""
    if not isinstance(setting, str):
        raise ValueError(f"sd_vae must be a VAE's name, {AUTOMATIC!r} or {NONE!r}, got {setting!r}")
    resolve(setting, None, available)
