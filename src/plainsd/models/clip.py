"""CLIP's text transformer (Radford et al. 2021), the prompt encoder of Stable Diffusion.

Module names are transformers' CLIPTextModel names (`text_model.encoder.layers.0.self_attn.q_proj`),
which are the keys SD1 checkpoints store under `cond_stage_model.transformer.`. OpenCLIP's keys (SD2)
are converted to these by plainsd.weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig, VisionConfig
from .layers import attention, quick_gelu


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool = True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Causal: each token sees itself and the tokens before it, never the padding after the prompt.
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=self.causal))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.act = quick_gelu if act == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig | VisionConfig, causal: bool = True):
        super().__init__()
        self.self_attn = CLIPAttention(cfg.width, cfg.heads, causal)
        self.layer_norm1 = nn.LayerNorm(cfg.width)
        self.mlp = CLIPMLP(cfg.width, int(cfg.width * cfg.mlp_ratio), getattr(cfg, "act", "quick_gelu"))
        self.layer_norm2 = nn.LayerNorm(cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.width)

    def forward(self, ids: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """ids past the vocabulary index `extra` (textual-inversion vectors): id vocab_size + i is extra[i]."""
        if extra is None:
            tokens = self.token_embedding(ids)
        else:
            vocab = self.token_embedding.num_embeddings
            tokens = self.token_embedding(ids.clamp(max=vocab - 1))
            rows = extra[(ids - vocab).clamp(min=0, max=max(len(extra) - 1, 0))].to(tokens.dtype)
            tokens = torch.where((ids >= vocab)[..., None], rows, tokens)
        return tokens + self.position_embedding.weight[: ids.shape[1]]


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.layers)])


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width)


class CLIPTextModel(nn.Module):
    """Token ids [B, T] -> hidden states [B, T, width].

    `clip_skip` picks the layer whose output is used, counted from the last (1 = last layer,
    2 = penultimate, as A1111's "Clip skip"); the final layer norm is applied to it unless the config says
    otherwise (SDXL reads its towers' penultimate states raw).
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)
        if cfg.projection_dim:
            self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.final_layer_norm.weight.dtype

    def forward(self, ids: torch.Tensor, clip_skip: int | None = None, extra: torch.Tensor | None = None) -> torch.Tensor:
        """extra: vectors for token ids past the vocabulary (textual inversion)."""
        return self.encode(ids, clip_skip, extra, pooled=False)[0]

    def encode(self, ids: torch.Tensor, clip_skip: int | None = None, extra: torch.Tensor | None = None,
               pooled: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the states forward gives, CLIP's text embedding as `pooled` gives it) from one run of the layers;
        without pooled, the layers after the clip_skip one are not run and the second item is None."""
        clip_skip = clip_skip or self.config.clip_skip
        n = len(self.text_model.encoder.layers)
        if not 1 <= clip_skip <= n:
            raise ValueError(f"clip_skip must be between 1 and {n} for this text encoder, got {clip_skip}")
        if ids.shape[1] > self.config.context_length:
            raise ValueError(f"at most {self.config.context_length} tokens per sequence, got {ids.shape[1]}")
        x = self.text_model.embeddings(ids, extra).to(self.dtype)
        states = None
        for i, layer in enumerate(self.text_model.encoder.layers[: n if pooled else n - clip_skip + 1]):
            x = layer(x)
            if i == n - clip_skip:
                states = x
        norm = self.text_model.final_layer_norm
        states = norm(states) if self.config.final_norm else states
        return states, (self._pool(norm(x), ids) if pooled else None)

    def pooled(self, ids: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """CLIP's text embedding: the last layer's state at the end token, projected if the model can."""
        return self.encode(ids, 1, extra)[1]

    def _pool(self, last: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The final-normed last layer's state at each sequence's end token, projected if the model can."""
        # The end token has the highest id, so argmax finds it (the first one, where padding is also EOT).
        vocab = self.text_model.embeddings.token_embedding.num_embeddings
        x = last[torch.arange(last.shape[0]), ids.masked_fill(ids >= vocab, 0).argmax(dim=-1)]  # not an embedding's ids
        return self.text_projection(x) if hasattr(self, "text_projection") else x


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(cfg.width) * cfg.width**-0.5)
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(images).flatten(2).transpose(1, 2)  # [B, patches, width]
        cls = self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight.to(x.dtype)


class CLIPVisionModel(nn.Module):
    """CLIP's ViT image tower (transformers' names): images in [-1, 1] -> projected embedding."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width)  # (sic: transformers' name)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([CLIPEncoderLayer(cfg, causal=False) for _ in range(cfg.layers)])
        self.post_layernorm = nn.LayerNorm(cfg.width)
        self.visual_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = self.pre_layrnorm(self.embeddings(images))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.visual_projection(self.post_layernorm(x[:, 0]))
