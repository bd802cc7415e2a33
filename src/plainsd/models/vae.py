"""AutoencoderKL (Rombach et al. 2022): images <-> latents, 8x smaller and 4 channels deep.

Attribute names equal the original checkpoint keys under `first_stage_model.`
(encoder.down.0.block.1.conv2, decoder.up.3.upsample.conv, quant_conv, ...).
encode/decode work on unscaled latents; the pipeline applies the latent scale factor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig
from .layers import attention


def norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            h = self.conv1(F.silu(self.norm1(x)))
            h = self.conv2(F.silu(self.norm2(h)))
            return self.nin_shortcut(x) + h
        # inference: the same numbers with one full-size tensor fewer alive at a time (the decoder's largest,
        # 256 channels at 512x512, is 268 MB in float32): SiLU in place, conv1's output let go before conv2
        # runs, the skip added in place
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = F.silu(self.norm2(h), inplace=True)
        return self.conv2(h).add_(self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convolutions as projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (p(y).flatten(2).transpose(1, 2) for p in (self.q, self.k, self.v))  # [B, HW, C]
        y = self.attend(q, k, v).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(y)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Single-head attention of [B, HW, C] queries, keys and values (on its own method so that a prepared
        model can run it another way: runtime/attention.py)."""
        return attention(q, k, v, heads=1)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as the original


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, chans = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch = cfg.ch
        for level, out in enumerate(chans):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(ch, out, g))
                ch = out
            if level != len(chans) - 1:
                stage.downsample = Downsample(ch)
            self.down.append(stage)
        self.mid = Mid(ch, g)
        self.norm_out = norm(ch, g)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, chans = cfg.norm_groups, [cfg.ch * m for m in cfg.ch_mult]
        ch = chans[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = Mid(ch, g)
        up = []
        for level in reversed(range(len(chans))):  # built deepest first, stored by level as the original
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(ch, chans[level], g))
                ch = chans[level]
            if level != 0:
                stage.upsample = Upsample(ch)
            up.insert(0, stage)
        self.up = nn.ModuleList(up)
        self.norm_out = norm(ch, g)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled()))


class DiagonalGaussian:
    """The encoder's output: a Gaussian per latent value, with mean and log-variance."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL divergence to the standard normal, summed over each sample's latent values."""
        return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.bias.dtype  # (not the weight: runtime may hold it packed, read back by copy)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """images [B, 3, H, W] in [-1, 1] -> latent distribution [B, z, H/8, W/8] (unscaled)."""
        f = self.config.factor
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"the VAE encodes [B, {self.config.in_channels}, H, W] images, got {list(images.shape)}")
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {images.shape[2]}x{images.shape[3]}")
        moments = self.quant_conv(self.encoder(images.to(self.dtype)))
        return DiagonalGaussian(moments.float())

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, z, h, w] (unscaled) -> images [B, 3, 8h, 8w], roughly in [-1, 1]."""
        if latents.ndim != 4 or latents.shape[1] != self.config.z_channels:
            raise ValueError(f"the VAE decodes [B, {self.config.z_channels}, h, w] latents, got {list(latents.shape)}")
        return self.decoder(self.post_quant_conv(latents.to(self.dtype))).float()

    def decode_tiled(self, latents: torch.Tensor, tile: int = 64, overlap: int = 16, wrap: bool = False) -> torch.Tensor:
        """decode() by overlapping latent tiles (tile x tile, `overlap` shared with each neighbour), blended
        with linear ramps across the overlaps: memory bounded by one tile, for images of any size.

        Each tile's decoder sees only its own latents (the mid-block attention is global), so the result
        differs a little from decode(); the ramps hide the tile borders. wrap: a seamless picture (tiling, its
        convolutions padding circularly): along a side longer than a tile the latents are first extended by
        `overlap` from the opposite edge, decoded, and the extension cut off again, so that the tiles at the
        edges see what continues them."""
        b, _, h, w = latents.shape
        if h <= tile and w <= tile:
            return self.decode(latents)
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap must be between 0 and tile - 1, got overlap {overlap} for tile {tile}")
        if wrap:
            f, ph, pw = self.config.factor, min(overlap, h) if h > tile else 0, min(overlap, w) if w > tile else 0
            wide = F.pad(latents, (pw, pw, ph, ph), mode="circular")
            return self.decode_tiled(wide, tile, overlap)[:, :, ph * f:(ph + h) * f, pw * f:(pw + w) * f]
        f, stride = self.config.factor, tile - overlap
        out = torch.zeros(b, self.config.in_channels, h * f, w * f)
        weight = torch.zeros(1, 1, h * f, w * f)
        for top in _starts(h, tile, stride):
            for left in _starts(w, tile, stride):
                piece = self.decode(latents[:, :, top:top + tile, left:left + tile])
                ph, pw = piece.shape[2:]
                ramp = (_ramp(ph, overlap * f, top > 0, top + tile < h)[:, None]
                        * _ramp(pw, overlap * f, left > 0, left + tile < w)[None, :])
                out[:, :, top * f:top * f + ph, left * f:left * f + pw] += piece * ramp
                weight[:, :, top * f:top * f + ph, left * f:left * f + pw] += ramp
        return out / weight

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(images)
        return self.decode(posterior.sample(generator)), posterior


def _starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one side: every `stride`, the last one flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(n: int, width: int, fade_in: bool, fade_out: bool) -> torch.Tensor:
    """Weights along one side of a tile: rising over `width` pixels where a neighbour comes before, falling
    where one comes after, 1 elsewhere (never 0, so every pixel keeps some weight)."""
    r = torch.ones(n)
    steps = (torch.arange(width, dtype=torch.float32) + 0.5) / width
    if fade_in and width:
        r[:width] = torch.minimum(r[:width], steps)
    if fade_out and width:
        r[n - width:] = torch.minimum(r[n - width:], steps.flip(0))
    return r

