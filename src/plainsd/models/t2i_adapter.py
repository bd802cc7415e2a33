"""T2I-Adapter (Mou et al. 2023): a small network that turns a hint picture into feature maps for the UNet's way down.

The picture is folded into the latent's size (pixel unshuffle by 8: 64 values per latent pixel and channel), then
runs through ResnetBlocks, num_res_blocks per level, the first of each deeper level halving the size. The output of
each level's last block is added to the UNet's features on the way down where diffusers' UNet adds them
(unet.adapter_taps). Unlike a ControlNet it has no copy of the UNet: it is small (about 77M parameters at SD1.5
size) and runs once per picture, not once per step.

SDXL's adapters (TencentARC's t2i-adapter-sdxl, diffusers' "full_adapter_xl", cfg.xl) fold the picture by 16 and
halve only at the third level: four maps at 1/2, 1/2, 1/4 and 1/4 of the latent's size for SDXL's three levels and
its middle block, where diffusers' UNet and the A1111 extension add them. A hint whose sides are multiples of 8 but
not of 16 is padded by repeating its last row and column (the UNet's halved levels round up the same way).

Attribute names equal the keys of TencentARC's files (conv_in, body.N.in_conv, body.N.block1, body.N.block2,
body.N.down_opt.op), so loading one is a strict load_state_dict (weights.py). The kind here is the one TencentARC's
adapters, diffusers' T2IAdapter ("full_adapter", "full_adapter_xl") and the A1111 extension run: shortcuts without a
convolution (TencentARC's sk=True), the kernel size of the 1x1 convolutions read from the file.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import AdapterConfig

UNSHUFFLE = 8  # the latent's factor: the hint is 8x the latent's size
XL_UNSHUFFLE = 16  # SDXL adapters' fold: their first maps are half the latent's size


class AdapterDownsample(nn.Module):
    """Halves the size: 2x2 average pooling (rounding up, as the UNet's downsampling does), or a strided 3x3
    convolution (use_conv)."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResnetBlock(nn.Module):
    """[halve,] [1x1 convolution to the new width,] then x + conv(relu(conv3x3(x)))."""

    def __init__(self, in_channels: int, out_channels: int, down: bool, ksize: int = 1, use_conv: bool = False):
        super().__init__()
        self.down_opt = AdapterDownsample(in_channels, use_conv) if down else None
        self.in_conv = nn.Conv2d(in_channels, out_channels, ksize, padding=ksize // 2) if in_channels != out_channels else None
        self.block1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(out_channels, out_channels, ksize, padding=ksize // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down_opt is not None:
            x = self.down_opt(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return x + self.block2(self.act(self.block1(x)))


class T2IAdapter(nn.Module):
    """adapter(hint [B, hint_channels, 8h, 8w] in [0, 1]) -> features: one per level, [B, channels[i], h / s_i,
    w / s_i] with s_i = self.scales()[i], rounding up (unscaled; the UNet adds them where unet.adapter_taps says)."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.config = cfg
        self.fold = XL_UNSHUFFLE if cfg.xl else UNSHUFFLE
        self.unshuffle = nn.PixelUnshuffle(self.fold)
        self.conv_in = nn.Conv2d(cfg.hint_channels * self.fold ** 2, cfg.channels[0], 3, padding=1)
        blocks, ch = [], cfg.channels[0]
        for level, out in enumerate(cfg.channels):
            for j in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(ch, out, down=self.halves(level) and j == 0, ksize=cfg.ksize,
                                          use_conv=cfg.use_conv))
                ch = out
        self.body = nn.ModuleList(blocks)

    def halves(self, level: int) -> bool:
        """Whether the level's first block halves the size: every level but the first, in SDXL's layout the third."""
        return level == 2 if self.config.xl else level > 0

    def scales(self) -> list[int]:
        """How many times smaller than the latent each feature map is."""
        scale, out = self.fold // UNSHUFFLE, []
        for level in range(len(self.config.channels)):
            scale *= 2 if self.halves(level) else 1
            out.append(scale)
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.bias.dtype

    def forward(self, hint: torch.Tensor) -> list[torch.Tensor]:
        cfg = self.config
        if hint.ndim != 4 or hint.shape[1] != cfg.hint_channels or hint.shape[-1] % UNSHUFFLE or hint.shape[-2] % UNSHUFFLE:
            raise ValueError(f"the T2I-Adapter takes [B, {cfg.hint_channels}, H, W] hints with H and W multiples of "
                             f"{UNSHUFFLE}, got {list(hint.shape)}")
        pad = [-side % self.fold for side in hint.shape[:-3:-1]]  # (width, height)
        if any(pad):
            hint = nn.functional.pad(hint, (0, pad[0], 0, pad[1]), mode="replicate")
        x = self.conv_in(self.unshuffle(hint.to(self.dtype)))
        features = []
        for i, block in enumerate(self.body):
            x = block(x)
            if i % cfg.num_res_blocks == cfg.num_res_blocks - 1:
                features.append(x)
        return features
