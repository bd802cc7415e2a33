"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser that wraps a denoiser."""

from __future__ import annotations

from typing import Callable

import torch


class CFGDenoiser:
    """D(x, sigma) = D_uncond + scale * (D_cond - D_uncond), both halves in one batch.

    cond / uncond are whatever the inner denoiser passes on to the network (the text states).
    With scale 1 (or no uncond) only the conditional half is computed. `guidance_until` (0..1] lets
    guidance stop after that fraction of the sigmas, after which only the conditional half is computed.
    """

    def __init__(self, denoiser: Callable, scale: float = 7.0, sigmas: torch.Tensor | None = None,
                 guidance_until: float = 1.0):
        self.denoiser = denoiser
        self.scale = float(scale)
        self.cutoff = None
        if sigmas is not None and guidance_until < 1.0:
            steps = len(sigmas) - 1
            last = max(int(round(steps * guidance_until)), 1)
            self.cutoff = float(sigmas[min(last, steps)])

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond, uncond=None, **extra) -> torch.Tensor:
        guided = uncond is not None and self.scale != 1.0
        if guided and self.cutoff is not None and float(torch.as_tensor(sigma).reshape(-1)[0]) <= self.cutoff:
            guided = False
        if not guided:
            return self.denoiser(x, sigma, cond=cond, **extra)
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=_cat(uncond, cond), **extra)
        d_uncond, d_cond = both.chunk(2)
        return d_uncond + (d_cond - d_uncond) * self.scale


def _cat(a, b):
    if isinstance(a, torch.Tensor):
        if a.shape[1:] != b.shape[1:]:
            raise ValueError(f"prompt and negative prompt encode to different shapes {list(b.shape)} and {list(a.shape)}")
        return torch.cat([a, b])
    raise TypeError("cond and uncond must be tensors")
