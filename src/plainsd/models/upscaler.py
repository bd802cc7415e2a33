"""Real-ESRGAN's compact super-resolution network (SRVGGNetCompact; Wang et al. 2021, realesr-*-x4v3 files).

A plain stack of 3x3 convolutions at the input's size, each followed by a PReLU (one slope per channel), then one
convolution to out_channels * scale**2 channels that a pixel shuffle turns into the picture at scale times the
size; the input, enlarged by nearest neighbour, is added, so the network learns only what nearest neighbour misses.
No work happens at the large size, which keeps it cheap on a CPU.

Module names equal the keys of Real-ESRGAN's files (`body.0.weight` the first convolution, `body.1.weight` its
PReLU, ..., `body.{2 * num_conv + 2}` the last convolution), which is what spandrel, and with it A1111 and
ComfyUI, read to recognise the architecture: a file this module saves works there too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UpscalerConfig


class CompactUpscaler(nn.Module):
    """upscaler(images [B, C, H, W] in [0, 1]) -> [B, C, scale * H, scale * W], not clamped (as Real-ESRGAN)."""

    def __init__(self, config: UpscalerConfig):
        super().__init__()
        self.config = config
        c = config
        layers: list[nn.Module] = [nn.Conv2d(c.in_channels, c.num_feat, 3, padding=1), nn.PReLU(c.num_feat)]
        for _ in range(c.num_conv):
            layers += [nn.Conv2d(c.num_feat, c.num_feat, 3, padding=1), nn.PReLU(c.num_feat)]
        layers.append(nn.Conv2d(c.num_feat, c.out_channels * c.scale ** 2, 3, padding=1))
        self.body = nn.ModuleList(layers)
        self.upsampler = nn.PixelShuffle(c.scale)

    @property
    def dtype(self) -> torch.dtype:
        return self.body[0].weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        return self.upsampler(out) + F.interpolate(x, scale_factor=self.config.scale, mode="nearest")

    @staticmethod
    def config_from_state_dict(state: dict[str, torch.Tensor]) -> UpscalerConfig:
        """The config a Real-ESRGAN compact state dict was made with, read off its shapes as spandrel does: the
        first convolution gives the input and feature channels, the number of body entries the convolutions, the
        last convolution's channels the scale (out_channels taken equal to in_channels)."""
        first = state["body.0.weight"]
        last = max(int(k.split(".")[1]) for k in state if k.startswith("body."))
        in_channels, num_feat = first.shape[1], first.shape[0]
        scale = round((state[f"body.{last}.weight"].shape[0] / in_channels) ** 0.5)
        return UpscalerConfig(in_channels=in_channels, out_channels=in_channels, num_feat=num_feat,
                              num_conv=(last - 2) // 2, scale=scale)
