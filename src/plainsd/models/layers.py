"""The few pieces shared by the networks: timestep embedding, attention, activations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cosines first (as latent diffusion)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False) -> torch.Tensor:
    """Multi-head scaled dot-product attention on [B, N, C] tensors.

    torch's SDPA, except for bf16 inference on the CPU, which takes plain bf16 matrix products: torch's
    CPU flash kernel is slow for SD's heads (of 40 at the first level: half the speed of oneDNN's GEMM).
    Long key sequences (self-attention at 1024+ tokens) go head by head (_attention_by_head), shorter ones
    (cross-attention on the 77 text tokens, the deep levels) in one batched product. Training (gradients
    needed) keeps SDPA."""
    bf16_cpu = q.dtype == torch.bfloat16 and q.device.type == "cpu" and not causal
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))  # torch.mm(out=) has no autograd
    if bf16_cpu and not needs_grad and k.shape[1] >= 1024:
        return _attention_by_head(q, k, v, heads)
    b, n, c = q.shape
    q, k, v = (t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2) for t in (q, k, v))
    if bf16_cpu and not needs_grad:
        out = _attention_batched(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(b, n, c)


def _attention_batched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for all batch items and heads at once (short key sequences: the scores fit
    in memory); bf16 scores, as in _attention_by_head."""
    b, h, n, d = q.shape
    q, k, v = (q * d ** -0.5).reshape(b * h, n, d), k.reshape(b * h, -1, d), v.reshape(b * h, -1, d)
    return torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1), v).reshape(b, h, n, d)


def _attention_by_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, rows: int = 1024) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on [B, N, C] tensors, for each batch item and head (a column slice: no copy
    into a head-major layout), `rows` queries at a time, with 2-D bf16 matrix products (oneDNN's bf16 GEMM):
    about twice as fast as SDPA's CPU kernel at 4096 tokens and head 40 on this machine. The scores are
    rounded to bf16 before the softmax (as attention in half precision did in SD for years), so the result
    is a little less exact than SDPA's float32 scores, within bf16 tolerance."""
    b, n, c = q.shape
    d = c // heads
    q = q * d ** -0.5
    out = torch.empty_like(q)
    for i in range(b):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            kt, vh = k[i, :, cols].t(), v[i, :, cols]
            for s in range(0, n, rows):
                torch.mm(torch.softmax(q[i, s:s + rows, cols] @ kt, dim=-1), vh, out=out[i, s:s + rows, cols])
    return out


class CrossAttention(nn.Module):
    """Attention with latent-diffusion's names: to_q, to_k, to_v (no bias), to_out.0."""

    def __init__(self, dim: int, context_dim: int | None, heads: int):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Identity())  # Identity where the original had Dropout

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection gives the value and its gate."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
