"""Captions for pictures: plainsd's own captioner for the shapes world, or BLIP; a folder's captions written for
training (`plainsd caption`), in kohya's same-name .txt files or Hugging Face imagefolder's metadata.jsonl.

    captioner = load_captioner()                 # the shipped captioner (plainsd-base.captioner.safetensors)
    captioner = load_captioner("blip-base/")     # a BLIP captioning model's folder (transformers' layout)
    captioner.caption([Image.open("a.png")])     # -> ["a large red circle on the left, blue background"]
    caption_folder("pictures/", captioner)       # a .txt beside each picture that has none yet
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image, ImageOps

from .config import CaptionerConfig
from .images import to_tensor
from .models.captioner import Captioner
from .train.data import read_metadata
from .weights import CheckpointError, read_tensors, write_safetensors

DEFAULT_CAPTIONER = Path(__file__).parent / "data" / "plainsd-base.captioner.safetensors"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # as train.data.FolderDataset reads them
FORMATS = ("txt", "jsonl")
METADATA = "metadata.jsonl"
CAPTIONER_PRECISIONS = ("auto", "bf16", "fp32")
BATCH = 64


class ImageCaptioner(Protocol):
    name: str

    def caption(self, images: list[Image.Image]) -> list[str]: ...


def read_captioner(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Captioner:
    """The network in a file written by `plainsd train captioner` (its config in the file's metadata)."""
    source = read_tensors(path)
    if "plainsd.captioner_config" not in source.metadata:
        raise CheckpointError(f"{path} is not a plainsd captioner file (no plainsd.captioner_config in its metadata)")
    values = json.loads(source.metadata["plainsd.captioner_config"])
    net = Captioner(CaptionerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}))
    expected = net.state_dict()
    wrong = [k for k in expected if k not in source.shapes or tuple(source.shapes[k]) != tuple(expected[k].shape)]
    if wrong or set(source.shapes) - set(expected):
        raise CheckpointError(f"{path} does not fit its own captioner config: {len(wrong)} tensors missing or "
                              "misshaped")
    net.load_state_dict({k: source.get(k).to(dtype) for k in expected})
    return net.to(dtype).eval().requires_grad_(False)


def save_captioner(net: Captioner, path: str | os.PathLike, dtype: torch.dtype = torch.float16,
                   metadata: dict[str, str] | None = None) -> Path:
    """The network as read_captioner reads it (float16 by default: a captioner file of a few MB)."""
    from dataclasses import asdict

    meta = {**(metadata or {}), "plainsd.captioner_config": json.dumps(asdict(net.config))}
    return write_safetensors({k: v.to(dtype) for k, v in net.state_dict().items()}, path, meta)


class ShapesCaptioner:
    """plainsd's own captioner: pictures of the shapes world -> captions naming every object's size, colour, shape
    and position and the background. Pictures of another size are fitted to the network's (centre crop, Lanczos)."""

    name = "plainsd"

    def __init__(self, net: Captioner):
        self.net = net

    @torch.no_grad()
    def caption(self, images: list[Image.Image]) -> list[str]:
        side = self.net.config.image_size
        out = []
        for start in range(0, len(images), BATCH):
            chunk = [ImageOps.fit(im.convert("RGB"), (side, side), Image.LANCZOS) for im in images[start:start + BATCH]]
            for words in self.net.generate(torch.cat([to_tensor(im) for im in chunk])):
                out.append(" ".join(words).replace(" ,", ","))
        return out


class BlipImageCaptioner:
    """A BLIP captioning model (plainsd.blip) behind the same one-method interface."""

    name = "blip"

    def __init__(self, blip):
        self.blip = blip

    def caption(self, images: list[Image.Image]) -> list[str]:
        return self.blip.caption([im.convert("RGB") for im in images])


def is_blip_folder(path: Path) -> bool:
    """Whether a folder holds a BLIP captioning model: transformers' config.json naming BlipForConditionalGeneration."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and ("BlipForConditionalGeneration" in (config.get("architectures") or [])
                                         or config.get("model_type") == "blip")


def captioner_kind(name_or_path: str | os.PathLike | None) -> str:
    """"plainsd" (the shipped captioner), "file" (one from `plainsd train captioner`) or "blip" (a BLIP folder);
    a ValueError naming what is allowed for anything else. Nothing is loaded."""
    if name_or_path is None or str(name_or_path) == "plainsd":
        return "plainsd"
    path = Path(name_or_path)
    if path.is_file():
        return "file"
    if path.is_dir() and is_blip_folder(path):
        return "blip"
    raise ValueError(f"unknown captioner {str(name_or_path)!r}: give \"plainsd\" (the shipped one), a file written by "
                     "`plainsd train captioner`, or a folder holding a BLIP captioning model (its config.json)")


def load_captioner(name_or_path: str | os.PathLike | None = None, precision: str = "fp32") -> ImageCaptioner:
    """None or "plainsd": the shipped captioner; a file from `plainsd train captioner`; a BLIP captioning model's
    folder (config.json and its safetensors, as the Hugging Face hub has Salesforce/blip-image-captioning-*).
    precision: "fp32", "bf16", or "auto": bf16 for a BLIP model where the CPU has native bf16 (runtime.choose_dtype),
    float32 for a captioner of the shapes world (a network that small gains nothing from bf16)."""
    if precision not in CAPTIONER_PRECISIONS:
        raise ValueError(f"unknown captioner precision {precision!r}; known: {', '.join(CAPTIONER_PRECISIONS)}")
    kind = captioner_kind(name_or_path)
    if kind != "blip":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return ShapesCaptioner(read_captioner(DEFAULT_CAPTIONER if kind == "plainsd" else name_or_path, dtype))
    from .blip import BlipCaptioner  # BLIP's network is imported only when a BLIP folder is used
    from .runtime import choose_dtype

    return BlipImageCaptioner(BlipCaptioner.from_folder(name_or_path, choose_dtype(precision)))


# --- a folder's captions, for training ------------------------------------------------------------------

@dataclass
class FolderCaptions:
    written: list[Path]    # the caption files written (txt), or the images captioned (jsonl)
    skipped: int           # images that already had a caption
    metadata: Path | None  # the metadata.jsonl written, for the jsonl format


def folder_images(folder: str | os.PathLike) -> list[Path]:
    """The pictures of a folder (not its subfolders), by name; a ValueError if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"no such folder: {folder}")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return images


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def caption_folder(folder: str | os.PathLike, captioner: ImageCaptioner, format: str = "txt", prefix: str = "",
                   suffix: str = "", overwrite: bool = False, progress: bool = True) -> FolderCaptions:
    """Caption each picture of a folder for training: "txt" writes kohya's same-name .txt beside it, "jsonl" a
    metadata.jsonl with file_name and text per picture (Hugging Face imagefolder; other rows and fields are kept).
    A picture that already has a non-empty caption is skipped unless overwrite. The text is prefix + caption +
    suffix, joined as given (e.g. prefix "sks, "). Every picture to caption is read before anything is written, so
    an unreadable one stops the run with nothing changed; each file is written whole (a temporary name, a rename)."""
    from tqdm.auto import tqdm

    from .train.loop import atomic_write

    if format not in FORMATS:
        raise ValueError(f"unknown caption format {format!r}; allowed: {', '.join(FORMATS)}")
    folder = Path(folder)
    images = folder_images(folder)
    meta_path = folder / METADATA
    rows = read_metadata(meta_path) if format == "jsonl" else []
    by_name = {r["file_name"]: r for r in rows}
    if format == "txt":
        done = {p for p in images if p.with_suffix(".txt").is_file() and p.with_suffix(".txt").read_text().strip()}
    else:
        done = {p for p in images if str(by_name.get(p.name, {}).get("text", "")).strip()}
    todo = images if overwrite else [p for p in images if p not in done]
    for path in todo:
        _open(path)  # an unreadable picture stops the run before anything is written
    written = []
    bar = tqdm(total=len(todo), desc="captioning", unit="image", disable=not progress)
    for start in range(0, len(todo), BATCH):
        chunk = todo[start:start + BATCH]
        for path, text in zip(chunk, captioner.caption([_open(p) for p in chunk])):
            text = f"{prefix}{text}{suffix}"
            if format == "txt":
                written.append(atomic_write(path.with_suffix(".txt"), text + "\n"))
            else:
                if path.name not in by_name:
                    by_name[path.name] = {"file_name": path.name}
                    rows.append(by_name[path.name])
                by_name[path.name]["text"] = text
                written.append(path)
        bar.update(len(chunk))
    bar.close()
    if format == "jsonl" and written:
        atomic_write(meta_path, "".join(json.dumps(r) + "\n" for r in rows))
    return FolderCaptions(written, len(images) - len(todo), meta_path if format == "jsonl" else None)
