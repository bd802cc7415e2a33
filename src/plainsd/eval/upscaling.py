"""How well an upscaler brings the shipped model's pictures to four times their size, on held-out scenes.

The shapes world renders a scene at any size, so the truth at 256x256 is exact: each held-out scene is drawn at
64x64, degraded through the VAE as the generator's pictures are (train/upscaler.vae_round_trip), upscaled, and
compared with the scene drawn at 256x256 (PSNR, the mean of the pictures' own) and read by the judge (the share of
pictures whose stated colour and shape, position and size it reads back, as metrics.adherence counts them).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from PIL import Image

from ..images import to_pil, to_tensor
from ..train.upscaler import render_pairs, to_bytes, to_unit, vae_round_trip
from .judge import judge
from .metrics import HELD_OUT_SEED, _scores, _shares, held_out_scenes


def held_out_pairs(vae, n: int = 100, objects: int = 1, scale: int = 4, size: int = 64):
    """(scenes, degraded small pictures, large renders), uint8, of n held-out scenes (every attribute stated);
    the VAE round trip takes the posterior's mean (the picture the scene's own latents give)."""
    scenes = held_out_scenes(n, objects, seed=HELD_OUT_SEED)
    small, large = render_pairs(scenes, size, scale)
    return scenes, vae_round_trip(vae, small), large


def psnr(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Each picture's PSNR in dB between two uint8 batches (peak 255)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1)
    return [10 * math.log10(255 ** 2 / max(float(m), 1e-10)) for m in mse]


def lanczos(small: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """uint8 pictures resized by Pillow's Lanczos (A1111's "Lanczos" upscaler)."""
    return torch.cat([to_bytes(to_tensor(p.resize((p.width * scale, p.height * scale), Image.LANCZOS)))
                      for p in to_pil(to_unit(small) * 2 - 1)])


def network(upscaler: torch.nn.Module, batch: int = 16) -> Callable[[torch.Tensor], torch.Tensor]:
    """A network working on [0, 1] images (plainsd's CompactUpscaler, a spandrel model) as a uint8 -> uint8 upscaler."""
    dtype = next(upscaler.parameters()).dtype

    def run(small: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = [upscaler(to_unit(c).to(dtype)).float().clamp(0, 1) for c in small.split(batch)]
        return (torch.cat(out) * 255).round().to(torch.uint8)

    return run


def adherence_of(pictures: torch.Tensor, scenes) -> dict[str, float]:
    """The judge's reading of uint8 pictures against their scenes: shares as metrics.adherence reports them."""
    return _shares([_scores(judge(p, s)) for p, s in zip(to_pil(to_unit(pictures) * 2 - 1), scenes)])


def compare(upscalers: dict[str, Callable[[torch.Tensor], torch.Tensor]], scenes, small: torch.Tensor,
            large: torch.Tensor) -> dict[str, dict]:
    """{name: {"psnr_db", "colour_and_shape", ...}} for each upscaler on the pairs, and "64x64" for the small
    pictures as they are (the judge only) and "render 256" for the truth (the judge only)."""
    out = {"64x64": adherence_of(small, scenes), "render 256": adherence_of(large, scenes)}
    for name, upscale in upscalers.items():
        big = upscale(small)
        values = psnr(big, large)
        out[name] = {"psnr_db": round(sum(values) / len(values), 2), **adherence_of(big, scenes)}
    return out
