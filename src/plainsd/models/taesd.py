"""The tiny decoder of TAESD (Tiny AutoEncoder for Stable Diffusion, madebyollin/taesd): latents -> image.

A plain stack of 3x3 convolutions with ReLU, three nearest-neighbour upsamplings and no attention or
normalisation: ~20x less work than SD's VAE decoder, at some loss of detail. It reads the UNet's latents
as they are (already multiplied by the scale factor) and returns images in [0, 1].

The layer order is TAESD's own nn.Sequential, so its files load by index ("1.weight", "3.conv.0.weight",
...), as do diffusers' AutoencoderTiny files ("decoder.layers.0.weight", ...: the same, numbered from the first conv). The width (64 in TAESD's
files) is read off the weights (plainsd.weights.load_tiny_decoder), so narrower ones, such as the shipped model's, load too.
"""

from __future__ import annotations

import torch
from torch import nn


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def _conv(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Block(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TinyDecoder(nn.Sequential):
    """decoder(latents [B, 4, h, w]) -> images [B, 3, 8h, 8w] in [0, 1]."""

    def __init__(self, latent_channels: int = 4, width: int = 64, out_channels: int = 3):
        layers: list[nn.Module] = [Clamp(), _conv(latent_channels, width), nn.ReLU()]
        for _ in range(3):
            layers += [Block(width, width), Block(width, width), Block(width, width),
                       nn.Upsample(scale_factor=2), _conv(width, width, bias=False)]
        layers += [Block(width, width), _conv(width, out_channels)]
        super().__init__(*layers)
        self.width, self.latent_channels = width, latent_channels

    @property
    def dtype(self) -> torch.dtype:
        return self[1].weight.dtype

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (what AutoencoderKL.decode returns), float32."""
        return (self(latents.to(self.dtype)).float() * 2 - 1).clamp(-1, 1)
