"""The latent-diffusion UNet (Rombach et al. 2022): the noise predictor of Stable Diffusion.

Attribute names equal the original checkpoint keys under `model.diffusion_model.`
(input_blocks.1.0.in_layers.2, middle_block.1.transformer_blocks.0.attn2.to_k, ...), so loading an
original checkpoint is a strict load_state_dict. Identity modules stand where the original had
Dropout so that the indices line up.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UNetConfig
from .layers import CrossAttention, FeedForward, guidance_scale_embedding, timestep_embedding
from .tome import bipartite_matching, check_ratio


class ResBlock(nn.Module):
    """Two 3x3 convolutions with the timestep embedding added in between, and a skip connection."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_channels), nn.SiLU(), nn.Identity(),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None].to(h.dtype)
        return self.skip_connection(x) + self.out_layers(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention on the text, GEGLU feed-forward; pre-norm, residual."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, merging: tuple[float, int, int] | None = None) -> torch.Tensor:
        """merging: (ratio, h, w) to run self-attention on merged tokens of the h x w map (models/tome.py)."""
        if merging is None:
            x = x + self.attn1(self.norm1(x))
        else:
            ratio, h, w = merging
            merge, unmerge = bipartite_matching(x, h, w, int(x.shape[1] * ratio))
            x = x + unmerge(self.attn1(merge(self.norm1(x))))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Flattens the feature map to tokens, runs transformer blocks on them, and adds the result back."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, linear: bool, groups: int,
                 downsample: int = 1):
        super().__init__()
        self.linear = linear
        self.downsample = downsample  # how much smaller than the latent its feature map is (1 = full resolution)
        self.merge_ratio = 0.0  # token merging before self-attention (UNetModel.set_token_merging)
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)])
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # [B, H*W, C]
        if self.linear:
            x = self.proj_in(x)
        merging = (self.merge_ratio, h, w) if self.merge_ratio > 0 else None
        for block in self.transformer_blocks:
            x = block(x, context, merging)
        if self.linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, c, h, w)
        if not self.linear:
            x = self.proj_out(x)
        return x + residual


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size=None) -> torch.Tensor:
        # `size` matches the skip connection when a latent side is not a multiple of the UNet's factor.
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers; ResBlocks get the timestep embedding, transformers the text."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, size=None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


# The parts a ControlNet (models/controlnet.py) copies: built by one function each so that both networks agree.

def _transformer(cfg: UNetConfig, ch: int, level: int) -> SpatialTransformer:
    return SpatialTransformer(ch, cfg.heads_for(ch), cfg.depth_at(level), cfg.context_dim, cfg.use_linear_proj,
                              cfg.norm_groups, downsample=2 ** level)


def time_embedding(cfg: UNetConfig) -> nn.Sequential:
    emb_dim = cfg.model_channels * 4
    return nn.Sequential(nn.Linear(cfg.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))


class GuidanceEmbedding(nn.Module):
    """The guidance-scale input of LCM-distilled UNets: the embedding of the scale w (layers.guidance_scale_embedding)
    projected to the timestep embedding's width and added to it before time_embed (diffusers' TimestepEmbedding
    cond_proj). Held by the UNet as `time_embedding`, so that its key is the one LCM single files carry:
    time_embedding.cond_proj.weight (diffusers' key, which its conversion to the original layout leaves as it is;
    stable-diffusion.cpp lists it under model.diffusion_model.)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.dim = cfg.time_cond_proj_dim
        self.cond_proj = nn.Linear(cfg.time_cond_proj_dim, cfg.model_channels, bias=False)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.cond_proj(guidance_scale_embedding(w, self.dim).to(self.cond_proj.weight.dtype))


def label_embedding(cfg: UNetConfig) -> nn.Sequential:
    """SDXL's embedding of the vector y (the pooled text and the embedded sizes, models/sdxl.py), added to the
    timestep embedding; nested as the original's label_emb.0.0 / label_emb.0.2 ("sequential" classes)."""
    emb_dim = cfg.model_channels * 4
    return nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))


def add_vector(net: nn.Module, emb: torch.Tensor, y: torch.Tensor | None, kind: str) -> torch.Tensor:
    """The timestep embedding [B, 4 * model_channels] with an SDXL network's vector y [B, adm_in_channels] embedded
    (net.label_emb) and added: y required where the net's config has adm_in_channels, refused elsewhere. kind: the
    net's name in the messages ("UNet", "ControlNet")."""
    adm = net.config.adm_in_channels
    if (y is None) != (adm <= 0):
        raise ValueError(f"an SDXL {kind} needs the vector y [B, {adm}] of pooled text and sizes" if adm > 0 else
                         f"this {kind} takes no vector y (it is not an SDXL {kind}): call it without y")
    if y is None:
        return emb
    if y.shape != (emb.shape[0], adm):
        raise ValueError(f"the {kind}'s vector y must be [{emb.shape[0]}, {adm}], got {list(y.shape)}")
    return emb + net.label_emb(y.to(emb.dtype))


def input_blocks(cfg: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """The way down: the first convolution, then ResBlocks (+ transformers) and a Downsample per level.
    Returns the blocks and the channels of each block's output (the skip connections)."""
    mc, groups, emb_dim = cfg.model_channels, cfg.norm_groups, cfg.model_channels * 4
    blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
    skip_channels, ch = [mc], mc
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers = [ResBlock(ch, emb_dim, mult * mc, groups)]
            ch = mult * mc
            if level in cfg.attention_levels:
                layers.append(_transformer(cfg, ch, level))
            blocks.append(TimestepEmbedSequential(*layers))
            skip_channels.append(ch)
        if level != len(cfg.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
            skip_channels.append(ch)
    return blocks, skip_channels


def middle_block(cfg: UNetConfig) -> TimestepEmbedSequential:
    ch, emb_dim, groups = cfg.model_channels * cfg.channel_mult[-1], cfg.model_channels * 4, cfg.norm_groups
    return TimestepEmbedSequential(ResBlock(ch, emb_dim, ch, groups), _transformer(cfg, ch, len(cfg.channel_mult) - 1),
                                   ResBlock(ch, emb_dim, ch, groups))


class UNetModel(nn.Module):
    """unet(x [B, C, h, w], timesteps [B], context [B, T, D]) -> eps (or v) prediction like x.

    control: residuals from ControlNets (models/controlnet.py), one per skip connection and one for the middle
    block's output, in that order, already scaled; they are added where the original ControlledUnetModel adds them.
    adapter: a T2I-Adapter's features (models/t2i_adapter.py), already scaled (run_input_blocks, adapter_taps).
    guidance: for a UNet with a guidance-scale embedding (cfg.time_cond_proj_dim > 0, LCM-distilled), the scale w
    it embeds, one or one per item, as diffusers' UNet gets it embedded in timestep_cond (its LCM pipeline passes
    guidance_scale - 1); None adds nothing to the timestep embedding, as diffusers does without timestep_cond.
    y: for an SDXL UNet (cfg.adm_in_channels > 0), the vector [B, adm_in_channels] of pooled text and embedded
    sizes (models/sdxl.py), required there and refused elsewhere (the original's name)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        if (cfg.num_heads > 0) == (cfg.head_dim > 0):
            raise ValueError("UNetConfig needs exactly one of num_heads and head_dim to be positive")
        self.config = cfg
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = mc * 4
        self.time_embed = time_embedding(cfg)
        if cfg.time_cond_proj_dim > 0:
            self.time_embedding = GuidanceEmbedding(cfg)
        if cfg.adm_in_channels > 0:
            self.label_emb = label_embedding(cfg)
        self.input_blocks, skip_channels = input_blocks(cfg)
        ch = skip_channels[-1]
        self.middle_block = middle_block(cfg)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * mc, groups)]
                ch = mult * mc
                if level in cfg.attention_levels:
                    layers.append(_transformer(cfg, ch, level))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def set_token_merging(self, ratio: float, max_downsample: int = 1) -> None:
        """Merge this fraction of the tokens before self-attention in the transformers whose feature map is at most
        max_downsample times smaller than the latent (A1111's defaults: 1, the full-resolution level only); 0 = off.
        Above 0.75 nothing more is merged (each 2x2 cell keeps one token)."""
        check_ratio(ratio)
        for module in self.modules():
            if isinstance(module, SpatialTransformer):
                module.merge_ratio = ratio if module.downsample <= max_downsample else 0.0

    @property
    def dtype(self) -> torch.dtype:
        return self.out[2].bias.dtype  # (not the weight: runtime may hold it packed, read back by copy)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                control: list[torch.Tensor] | None = None, adapter: list[torch.Tensor] | None = None,
                guidance: torch.Tensor | float | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"the UNet takes [B, {cfg.in_channels}, h, w] latents, got {list(x.shape)}")
        if context.shape[-1] != cfg.context_dim:
            raise ValueError(f"the UNet reads text states of width {cfg.context_dim}, got {context.shape[-1]}")
        dtype = self.dtype
        emb = self.embed_timesteps(timesteps, x.shape[0], guidance, y)
        context = context.to(dtype)
        skips = self.run_input_blocks(x.to(dtype), emb, context, adapter=adapter)
        h = add_adapter_middle(self.middle_block(skips[-1], emb, context), adapter, cfg)
        if control is not None:
            skips, h = add_control(skips, h, control)
        h = self.run_output_blocks(h, skips, emb, context)
        return self.out(h).to(x.dtype)

    # The steps forward composes, public so that a caller can run part of the UNet (fast.DeepCacheUNet keeps the
    # features entering a late output block and, on the calls in between, runs only the outer blocks around them).

    def embed_timesteps(self, timesteps: torch.Tensor | float, batch: int,
                        guidance: torch.Tensor | float | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """The timestep embedding [batch, 4 * model_channels] in the UNet's dtype; timesteps: one, or one per item.
        guidance: the guidance scale an LCM-distilled UNet embeds (forward), one or one per item.
        y: an SDXL UNet's vector (forward), one row per item."""
        device = self.out[2].bias.device
        timesteps = torch.as_tensor(timesteps, device=device).reshape(-1).expand(batch)
        emb = timestep_embedding(timesteps, self.config.model_channels).to(self.dtype)
        if guidance is not None:
            if self.config.time_cond_proj_dim <= 0:
                raise ValueError("this UNet has no guidance-scale embedding (it is not LCM-distilled): call it "
                                 "without guidance")
            emb = emb + self.time_embedding(torch.as_tensor(guidance, device=device).reshape(-1).expand(batch))
        return add_vector(self, self.time_embed(emb), y, "UNet")

    def run_input_blocks(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                         stop: int | None = None, adapter: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The outputs of input blocks 0 .. stop - 1 (all when None), each fed the one before: the skip
        connections, the last of them the features that go on down.

        adapter: a T2I-Adapter's feature maps, added to the outputs of the input blocks adapter_taps names before
        they become skips and go on (one more map, an SDXL adapter's, is the middle block's: add_adapter_middle)."""
        taps = [block for block, _, _ in adapter_taps(self.config)] if adapter is not None else []
        if adapter is not None and len(adapter) not in (len(taps) - 1, len(taps)):
            raise ValueError(f"a T2I-Adapter for this UNet gives {len(taps) - 1} feature maps (or one more for its "
                             f"middle block), got {len(adapter)}")
        skips = []
        for i, block in enumerate(itertools.islice(self.input_blocks, stop)):
            h = block(h, emb, context)
            if i in taps:
                h = _add_feature(h, adapter[taps.index(i)])
            skips.append(h)
        return skips

    def run_output_blocks(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor, context: torch.Tensor,
                          start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Output blocks start .. stop - 1 (to the last when None) on the features h entering block `start`.

        Output block j mirrors input block n - 1 - j: each takes the last skip off the list (so that it is freed
        once used) and, where it upsamples, matches the size of the skip before it. From `start` on the list must
        hold the outputs of the first n - start input blocks; what the blocks run leaves the rest."""
        for block in itertools.islice(self.output_blocks, start, stop):
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, context, size=skips[-1].shape[-2:] if skips else None)
        return h


MIDDLE = None  # adapter_taps' block for the middle block's output


def adapter_taps(cfg: UNetConfig) -> list[tuple[int | None, int, int]]:
    """Where a T2I-Adapter's feature maps go, as diffusers' UNet adds them (down_intrablock_additional_residuals):
    (input block, its channels, how many times smaller than the latent its output is), one per level and, last,
    the middle block's output (MIDDLE), which SDXL's adapters give a map too. A level's map goes after its last
    ResBlock (and transformer) where the level has attention or is the last, else after its Downsample: input
    blocks 2, 5, 8, 11 in SD, 3, 5, 8 in SDXL."""
    per, last = cfg.num_res_blocks + 1, len(cfg.channel_mult) - 1
    taps = []
    for level, mult in enumerate(cfg.channel_mult):
        past = int(level not in cfg.attention_levels and level != last)  # after the level's Downsample
        taps.append((level * per + cfg.num_res_blocks + past, cfg.model_channels * mult, 2 ** (level + past)))
    return taps + [(MIDDLE, cfg.model_channels * cfg.channel_mult[-1], 2 ** last)]


def add_adapter_middle(h: torch.Tensor, adapter: list[torch.Tensor] | None, cfg: UNetConfig) -> torch.Tensor:
    """The middle block's output with a T2I-Adapter's map for it added, where it gives one (SDXL's: their fourth)."""
    if adapter is None or len(adapter) < len(adapter_taps(cfg)):
        return h
    return _add_feature(h, adapter[-1])


def _add_feature(h: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    if feature.shape[-3:] != h.shape[-3:]:
        raise ValueError(f"a T2I-Adapter's feature map is {list(feature.shape[-3:])} (channels, height, width) where "
                         f"the UNet's features are {list(h.shape[-3:])}: the adapter is for another kind of model, or "
                         "its hint is not 8 times the latent's size")
    return h + feature.to(h.dtype)


def add_control(skips: list[torch.Tensor], middle: torch.Tensor, control: list[torch.Tensor]):
    """The skip connections and the middle block's output with a ControlNet's residuals added."""
    if len(control) != len(skips) + 1:
        raise ValueError(f"a ControlNet for this UNet gives {len(skips) + 1} residuals, got {len(control)}")
    skips = [s + c.to(s.dtype) for s, c in zip(skips, control)]
    return skips, middle + control[-1].to(middle.dtype)
