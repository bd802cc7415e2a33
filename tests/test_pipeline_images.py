"""Stored pictures: a dozen generations across the pipeline's features, compared with PNGs made by an earlier
version, so that a change which moves what users get cannot pass unnoticed.

The cases cover txt2img, img2img, inpainting (an ordinary and a 9-channel model), the hires fix (latent and image
upscalers), a LoRA tag, a textual-inversion embedding, fast mode, token merging and several samplers, on tiny
random models and on the shipped model. They run in float32, where CPU classes (AVX2, AVX-512, AMX) differ only
in the last bits of sums; the tolerance below holds for those differences, a changed picture moves far more.

    python -m tests.test_pipeline_images --record          # write the stored pictures again (after a wanted change)
    python -m tests.test_pipeline_images --hashes [--bf16]  # sha256 of each picture: the same bytes before and after
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import shutil
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import plainsd
from plainsd import pipeline, runtime
from plainsd.embeddings import Embedding, save_embedding
from plainsd.pipeline import HiresFix

STORED = Path(__file__).parent / "data" / "pipeline_images"
# A changed picture moves many pixels by many levels; float32's last bits, amplified by a sampler, a level on a few
# pixels (the kernels held to AVX2 or SSE4.1 with ONEDNN_MAX_CPU_ISA and ATEN_CPU_CAPABILITY moved no pixel by more
# than one). Mean and max of the absolute difference, in 8-bit levels.
MEAN_TOLERANCE, MAX_TOLERANCE = 0.1, 6


def _scene(size: int, colour: str, box: tuple[int, int, int, int], background: str = "navy") -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    ImageDraw.Draw(image).ellipse(box, fill=colour)
    return image


def _mask(size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=255)
    return mask


@cache
def _files(dtype: torch.dtype) -> Path:
    """A LoRA folder and an embeddings folder for the tiny model, made from fixed seeds."""
    from tests.test_lora import random_lora

    root = Path(tempfile.mkdtemp(prefix="plainsd-images-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    (root / "loras").mkdir()
    (root / "embeddings").mkdir()
    sd = _tiny("tiny", dtype).sd
    save_file(random_lora(sd, seed=7), str(root / "loras" / "style.safetensors"))
    g = torch.Generator().manual_seed(8)
    save_embedding(Embedding("mything", torch.randn(2, sd.config.text.width, generator=g) * 0.02),
                   root / "embeddings" / "mything.safetensors")
    return root


# Every model runs as the CLI and the server run it: prepared (packed weights, the attention this CPU runs best).
@cache
def _tiny(name: str, dtype: torch.dtype):
    return runtime.prepare(plainsd.build(name, seed=0).to(dtype))


@cache
def _shipped(dtype: torch.dtype):
    return runtime.prepare(plainsd.load(dtype=dtype))


def _cases(dtype: torch.dtype) -> dict:
    """name -> a function drawing that case's pictures."""
    tiny, shipped = (lambda: _tiny("tiny", dtype)), (lambda: _shipped(dtype))
    full = dict(sampler="DPM++ 2M")  # the shipped model's 20-step settings (without a sampler: its LCM-LoRA's)
    files = lambda: _files(dtype)  # noqa: E731
    quick = dict(steps=6, seed=1)
    return {
        "tiny-txt2img-dpmpp2m-batch": lambda: pipeline.txt2img(
            tiny(), "a (red:1.3) circle, [blue] square", "noise", batch_size=2, cfg_scale=6, **quick),
        "tiny-txt2img-euler-a": lambda: pipeline.txt2img(
            tiny(), "a green star", sampler="Euler a", width=48, height=72, steps=6, seed=2),
        "tiny-txt2img-dpmpp-sde-karras": lambda: pipeline.txt2img(
            tiny(), "a big cross BREAK on the right", sampler="DPM++ SDE Karras", clip_skip=2, **quick),
        "tiny-img2img": lambda: pipeline.img2img(
            tiny(), _scene(64, "red", (10, 10, 40, 40)), "a blue circle", strength=0.6, sampler="Euler", **quick),
        "tiny-inpaint": lambda: pipeline.inpaint(
            tiny(), _scene(64, "yellow", (20, 20, 50, 50)), _mask(64), "a square", **quick),
        "tiny-inpaint-native": lambda: pipeline.inpaint(
            _tiny("tiny-inpaint", dtype), _scene(64, "yellow", (20, 20, 50, 50)), _mask(64), "a square", **quick),
        "tiny-hires-latent": lambda: pipeline.txt2img(
            tiny(), "a circle", hires=HiresFix(scale=1.5, strength=0.5, steps=4), **quick),
        "tiny-hires-lanczos": lambda: pipeline.txt2img(
            tiny(), "a circle", hires=HiresFix(width=96, height=80, upscaler="Lanczos", sampler="Euler a",
                                             prompt="a square"), **quick),
        "tiny-lora": lambda: pipeline.txt2img(
            tiny(), "a circle <lora:style:0.8>", lora_dir=files() / "loras", **quick),
        "tiny-embedding": lambda: pipeline.txt2img(
            tiny(), "a (mything:1.1) circle", embeddings_dir=files() / "embeddings", **quick),
        "tiny-fast": lambda: pipeline.txt2img(tiny(), "a circle", fast=True, steps=10, seed=3),
        "tiny-token-merging": lambda: pipeline.txt2img(tiny(), "a circle", token_merging=0.5, **quick),
        "shipped-txt2img": lambda: pipeline.txt2img(shipped(), "a red circle on the left, on a blue background",
                                                    seed=1, batch_size=2, **full),
        "shipped-lcm-lora": lambda: pipeline.txt2img(shipped(), "a red circle on the left, on a blue background",
                                                     seed=1, batch_size=2),  # (its recommended settings: the LoRA)
        "shipped-img2img": lambda: pipeline.img2img(
            shipped(), _scene(64, "green", (4, 20, 28, 44), "white"), "a yellow square on the right", seed=2,
            strength=0.7, **full),
        "shipped-inpaint": lambda: pipeline.inpaint(
            shipped(), _scene(64, "green", (4, 20, 28, 44), "white"), _mask(64), "a red triangle", seed=3, **full),
        "shipped-fast": lambda: pipeline.txt2img(shipped(), "a small purple diamond at the top", seed=4, fast=True, **full),
        "shipped-hires": lambda: pipeline.txt2img(
            shipped(), "a big orange cross", seed=5, steps=12, hires=HiresFix(scale=2.0, upscaler="Latent (bicubic)"),
            **full),
        "shipped-heun-ddim": lambda: [*pipeline.txt2img(shipped(), "a blue square", seed=6, steps=8,
                                                        sampler="Heun").images,
                                      *pipeline.txt2img(shipped(), "a blue square", seed=6, steps=8,
                                                        sampler="DDIM").images],
    }


def render(name: str, dtype: torch.dtype = torch.float32) -> list[Image.Image]:
    out = _cases(dtype)[name]()
    return out if isinstance(out, list) else out.images


def _stored(name: str, i: int) -> Path:
    return STORED / f"{name}-{i}.png"


CASES = list(_cases(torch.float32))


@pytest.mark.parametrize("name", CASES)
def test_pictures_match_the_stored_ones(name):
    pictures = render(name)
    stored = [p for p in STORED.glob(f"{name}-*.png") if p.stem[len(name) + 1:].isdigit()]  # not tiny-inpaint-native's
    assert len(pictures) == len(stored), f"{name}: {len(pictures)} pictures, {len(stored)} stored"
    for i, picture in enumerate(pictures):
        expected = np.asarray(Image.open(_stored(name, i)).convert("RGB"), dtype=np.int16)
        got = np.asarray(picture.convert("RGB"), dtype=np.int16)
        assert got.shape == expected.shape, f"{name}-{i}: {got.shape} against the stored {expected.shape}"
        diff = np.abs(got - expected)
        assert diff.mean() <= MEAN_TOLERANCE and diff.max() <= MAX_TOLERANCE, (
            f"{name}-{i}: differs from the stored picture by {diff.mean():.3f} levels on average, {diff.max()} at most")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--record", action="store_true", help="write the stored pictures (float32)")
    parser.add_argument("--hashes", action="store_true", help="print each picture's sha256")
    parser.add_argument("--bf16", action="store_true", help="with --hashes: the networks in bfloat16")
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.record:
        STORED.mkdir(parents=True, exist_ok=True)
        for old in STORED.glob("*.png"):
            old.unlink()
    for name in CASES:
        for i, picture in enumerate(render(name, dtype)):
            if args.record:
                picture.save(_stored(name, i))
            if args.hashes:
                print(f"{name}-{i} {hashlib.sha256(picture.tobytes()).hexdigest()[:16]}")


if __name__ == "__main__":
    main()
