"""ControlNet (Zhang, Rao & Agrawala 2023): a trainable copy of the UNet's way down that reads a hint image.

The copy (time embedding, input blocks, middle block; built by the same functions as the UNet's) takes the
noisy latent plus the hint, brought to the latent's size by `input_hint_block`, and hands one residual per
skip connection and one for the middle block to the UNet (unet.forward's `control`). Each residual leaves
through a 1x1 convolution that starts at zero (`zero_convs`, `middle_block_out`), so a new ControlNet changes
nothing until it has learnt something.

Attribute names equal the keys of lllyasviel's ControlNet files (after the `control_model.` prefix some of
them carry): input_hint_block.0, zero_convs.3.0, middle_block_out.0, input_blocks..., so loading one is a
strict load_state_dict (weights.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import UNetConfig
from .layers import timestep_embedding
from .unet import TimestepEmbedSequential, add_vector, input_blocks, label_embedding, middle_block, time_embedding

# The hint encoder's channels after each of its convolutions, and which of them halve the size (three: the
# latent's factor 8). The last convolution brings them to the UNet's first-level channels and starts at zero.
HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)
HINT_STRIDES = (1, 1, 2, 1, 2, 1, 2)


def zero_conv(channels: int) -> TimestepEmbedSequential:
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return TimestepEmbedSequential(conv)


def hint_block(hint_channels: int, out_channels: int) -> TimestepEmbedSequential:
    """3x3 convolutions with SiLU between them (indices 0, 2, ..., 14 hold the convolutions, as in the files)."""
    layers, ch = [], hint_channels
    for out, stride in zip(HINT_CHANNELS, HINT_STRIDES):
        layers += [nn.Conv2d(ch, out, 3, padding=1, stride=stride), nn.SiLU()]
        ch = out
    last = nn.Conv2d(ch, out_channels, 3, padding=1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return TimestepEmbedSequential(*layers, last)


class ControlNet(nn.Module):
    """controlnet(x [B, C, h, w], hint [B, 3, 8h, 8w] in [0, 1], timesteps [B], context [B, T, D], y=None)
    -> residuals: one per UNet skip connection, then one for the middle block (unscaled). y: an SDXL ControlNet's
    vector [B, adm_in_channels], the one its UNet gets (UNetModel.forward)."""

    def __init__(self, cfg: UNetConfig, hint_channels: int = 3):
        super().__init__()
        self.config = cfg
        self.hint_channels = hint_channels
        self.time_embed = time_embedding(cfg)
        if cfg.adm_in_channels > 0:  # SDXL's: the vector of pooled text and sizes, as the UNet reads it
            self.label_emb = label_embedding(cfg)
        self.input_hint_block = hint_block(hint_channels, cfg.model_channels)
        self.input_blocks, skip_channels = input_blocks(cfg)
        self.zero_convs = nn.ModuleList([zero_conv(ch) for ch in skip_channels])
        self.middle_block = middle_block(cfg)
        self.middle_block_out = zero_conv(skip_channels[-1])
        # "shuffle" models (global average pooling in lllyasviel's configs, diffusers' global_pool_conditions): each
        # residual is averaged over the picture; such a model is meant for the conditional half of CFG only
        self.global_pool = False

    @property
    def dtype(self) -> torch.dtype:
        return self.middle_block_out[0].bias.dtype

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                stop: int | None = None, y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """stop: only the residuals of the first `stop` input blocks (for a UNet call that runs only its outer
        blocks, fast.DeepCacheUNet's cheap calls); None: all of them and the middle block's."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"the ControlNet takes [B, {cfg.in_channels}, h, w] latents, got {list(x.shape)}")
        factor = 2 ** sum(s == 2 for s in HINT_STRIDES)
        if hint.shape[-2:] != (x.shape[-2] * factor, x.shape[-1] * factor) or hint.shape[1] != self.hint_channels:
            raise ValueError(f"the ControlNet's hint must be [B, {self.hint_channels}, {x.shape[-2] * factor}, "
                             f"{x.shape[-1] * factor}] for these latents, got {list(hint.shape)}")
        dtype = self.dtype
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])
        emb = add_vector(self, self.time_embed(timestep_embedding(timesteps, cfg.model_channels).to(dtype)), y,
                         "ControlNet")
        context = context.to(dtype)
        guided_hint = self.input_hint_block(hint.to(dtype), emb, context)
        h, outs = x.to(dtype), []
        for i, (block, zero) in enumerate(zip(self.input_blocks[:stop], self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided_hint
            outs.append(zero(h, emb, context))
        if stop is None:
            h = self.middle_block(h, emb, context)
            outs.append(self.middle_block_out(h, emb, context))
        if self.global_pool:
            outs = [o.mean(dim=(2, 3), keepdim=True) for o in outs]
        return outs
