"""bf16 attention on a CPU without AMX: oneDNN's matrix products where torch's SDPA kernel is slow.

On a CPU that multiplies bf16 natively but has no AMX tiles (avx512_bf16 alone), torch's CPU flash kernel is
slow for SD's heads (of 40 at the first level), slower than oneDNN's bf16 matrix products. There, large score
matrices (a quarter million scores per head and up: self-attention at 1024+ tokens, the text's 77 keys at 4096)
go head by head with the softmax's exp fused into the first product (_attention_fused); smaller ones in one
batched product and torch's softmax (_attention_batched), which wins there on fewer calls. With AMX, SDPA's
kernel runs its products on the tiles and is the fastest at every size SD has. benchmarks/attention.py measures
both on the CPU at hand (benchmarks/attention-amx.md). Float32 keeps SDPA, and so do training (gradients needed:
oneDNN's ops have no autograd), causal attention, and a graph being traced or compiled (OpenVINO's conversion,
say), which has no use for oneDNN's own ops.

The networks themselves run plain SDPA (models/layers.attention), through an `attend` method of their attention
layers (models/layers.CrossAttention, models/vae.AttnBlock, models/blip's VisionAttention and TextAttention). prepare() gives those layers this module's
attention by swapping their class for a subclass whose `attend` is `attention` below (use_runtime_attention;
the class swap runtime/packing.py describes). The subclasses hold no state of their own and choose per call, so
nothing needs undoing when the model is cast or loaded.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models import layers
from ..models.blip import TextAttention, VisionAttention
from ..models.layers import CrossAttention
from ..models.vae import AttnBlock


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, causal: bool = False) -> torch.Tensor:
    """models/layers.attention (torch's SDPA) on [B, N, C] tensors, except for bf16 inference on a CPU without
    AMX, which takes a oneDNN path (module doc): _attention_fused for a quarter million scores per head and up,
    _attention_batched for fewer than 1024 keys, SDPA otherwise."""
    bf16_cpu = (q.dtype == torch.bfloat16 and q.device.type == "cpu" and not causal and not _amx()
                and not torch.jit.is_tracing() and not _compiling())
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))  # oneDNN's ops have no autograd
    if not bf16_cpu or needs_grad:
        return layers.attention(q, k, v, heads, causal)
    if q.shape[1] * k.shape[1] >= 1 << 18 and _fused_exp_available():
        return _attention_fused(q, k, v, heads)
    if k.shape[1] < 1024:
        b, n, c = q.shape
        q, k, v = (t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2) for t in (q, k, v))
        return _attention_batched(q, k, v).transpose(1, 2).reshape(b, n, c)
    return layers.attention(q, k, v, heads, causal)


def head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention on [B, heads, N, d] tensors (BLIP's layers, whose keys and values are cached split into heads):
    _attention_batched for bf16 inference on a CPU without AMX when there is no mask and fewer than 1024 keys
    (BLIP's 577 image tokens; the one query per word of its decoder, where SDPA's kernel is slowest), SDPA
    otherwise."""
    fast = (q.dtype == torch.bfloat16 and q.device.type == "cpu" and mask is None and k.shape[2] < 1024
            and not _amx() and not torch.jit.is_tracing() and not _compiling()
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))))
    return _attention_batched(q, k, v) if fast else F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _attention_batched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for all batch items and heads at once (short key sequences: the scores fit
    in memory). The scores are rounded to bf16 before the softmax (as attention in half precision did in SD
    for years): a little less exact than SDPA's float32 scores, within bf16 tolerance."""
    b, h, n, d = q.shape
    q, k, v = (q * d ** -0.5).reshape(b * h, n, d), k.reshape(b * h, -1, d), v.reshape(b * h, -1, d)
    return torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1), v).reshape(b, h, n, d)


# The exponentials of the softmax run inside oneDNN's matrix product, as its fused sigmoid: for z <= -8,
# sigmoid(z) = e^z / (1 + e^z) is e^z to 3e-4 (below bf16's rounding). Each query's scores are shifted by an upper
# bound of their maximum plus this margin, so that every z is <= -8; the shift cancels in the normalisation.
_EXP_MARGIN = 8.0
# A row whose sum of exponentials is below e^-60 had its maximum 52+ below the bound: so far down that float32's
# underflow (e^-87) could lose weights that matter. Such rows are computed again, shifted by their exact maximum.
_MIN_SUM = math.exp(-60.0)
# A head whose sampled queries have a bound 40+ above their maximum takes the exact maximum for every query
# (one more matrix product, but no rows computed twice): Cauchy-Schwarz is loose for wide heads such as the
# VAE's single head of 512.
_LOOSE = 40.0


def _attention_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, rows: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on bf16 [B, N, C] tensors, for each batch item and head, `rows` queries at a
    time, in two oneDNN matrix products and no softmax pass (torch's softmax, its exp above all, is much of a
    plain bf16 attention's time at thousands of tokens):

        P = sigmoid([q/sqrt(d), -t] [k, 1]^T) = exp(q k^T / sqrt(d) - t)   (t: the query's shift)
        [O, S] = P [v, 1]                                                   (S: the row sums of P)
        out = O / S

    The shift is an upper bound of the query's scores plus _EXP_MARGIN: q . c + |q| max_j |k_j - c| >= q . k_j
    for every key (Cauchy-Schwarz around the keys' mean c). Where that bound is too loose (a head's sampled
    queries, or a row whose S underflowed) the shift is the exact maximum instead (_exact_shift). t takes two
    columns, its bf16 value and the rest (_put_shift): one bf16 number would be off by units for scores in
    the thousands. The rows [q/sqrt(d), -t] and [k, 1] (d + 2 wide: t's two columns) are padded with zeros to
    a multiple of 4, those of [v, 1] and the number of keys to a multiple of 16 (a padded key has a zero value
    and a zero in the sum column: it adds nothing). Within bf16 tolerance of float32 SDPA (tested): P and S
    are rounded to bf16 before the division, so the error is about 1.5x that of bf16 SDPA."""
    b, n, c = q.shape
    m, d = k.shape[1], c // heads
    # padded sizes: q and k's rows (d + 2) to a multiple of 4, [v, 1] (d + 1) and the keys to multiples of 16
    # (the sizes oneDNN runs fastest: a narrower first product, a 16-wide second one)
    dq, dv, mp = -(-(d + 2) // 4) * 4, -(-(d + 1) // 16) * 16, -(-m // 16) * 16
    rows = rows or max(512, (1 << 21) // mp)  # 2 M scores (4 MB) at a time
    qs = (q * d ** -0.5).contiguous()  # the scaled query, rounded once
    qf, kf = qs.float().view(b, n, heads, d), k.float().reshape(b, m, heads, d)
    centre = kf.mean(dim=1)  # [B, heads, d]
    radius = torch.linalg.vector_norm(kf - centre[:, None], dim=-1).amax(dim=1)  # [B, heads]
    # bound [B, N, heads]: q . c for every head in one product, with c in column h of a block-diagonal [C, heads]
    blocks = (torch.eye(heads)[None, :, :, None] * centre[:, None]).reshape(b, heads, c).transpose(1, 2)
    bound = torch.bmm(qf.view(b, n, c), blocks) + torch.linalg.vector_norm(qf, dim=-1) * radius[:, None]
    qp = q.new_zeros(b, heads, n, dq)  # [q/sqrt(d), -t, 0...]
    qp[..., :d] = qs.view(b, n, heads, d).transpose(1, 2)
    _put_shift(qp, d, (bound + _EXP_MARGIN).transpose(1, 2))
    kp = k.new_zeros(b, heads, mp, dq)  # [k, 1, 1, 0...]
    kp[:, :, :m, :d] = k.reshape(b, m, heads, d).transpose(1, 2)
    kp[:, :, :m, d:d + 2] = 1
    vp = v.new_zeros(b, heads, mp, dv)  # [v, 1, 0...], handed to oneDNN transposed: linear's (out, in) weight
    vp[:, :, :m, :d] = v.reshape(b, m, heads, d).transpose(1, 2)
    vp[:, :, :m, d] = 1
    sample = slice(None, None, max(1, n // 32))
    xs = qp[:, :, sample].clone()
    xs[..., d:] = 0
    top = (xs @ kp.transpose(-1, -2))[..., :m].amax(dim=-1)  # [B, heads, 32]: the sampled queries' exact maxima
    loose = ((bound[:, sample].transpose(1, 2) - top.float()).amax(dim=-1) > _LOOSE).tolist()  # [B][heads]
    linear = torch.ops.mkldnn._linear_pointwise

    def attend(x: torch.Tensor, i: int, h: int, exact: bool) -> torch.Tensor:
        if exact:
            x = _exact_shift(x, kp[i, h], d, m)
        return linear(linear(x, kp[i, h], None, "sigmoid", [], ""), vp[i, h].t(), None, "none", [], "")

    out, sums = torch.empty_like(q), []
    for i in range(b):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            for s in range(0, n, rows):
                o = attend(qp[i, h, s:s + rows], i, h, loose[i][h])
                torch.div(o[:, :d], o[:, d:d + 1], out=out[i, s:s + rows, cols])
                sums.append(o[:, d])
    low = torch.cat(sums).view(b, heads, n) < _MIN_SUM
    for i, h in low.any(dim=-1).nonzero().tolist():  # the bound was too far above: these rows again, exactly
        r, cols = low[i, h].nonzero()[:, 0], slice(h * d, (h + 1) * d)
        for s in range(0, len(r), rows):
            o = attend(qp[i, h, r[s:s + rows]], i, h, True)
            out[i, r[s:s + rows], cols] = o[:, :d] / o[:, d:d + 1]
    return out


def _exact_shift(x: torch.Tensor, kp: torch.Tensor, d: int, m: int) -> torch.Tensor:
    """x ([q/sqrt(d), -t, 0...] rows of _attention_fused) with t each query's largest score over the m real keys
    plus the margin: one more product. The scores come out rounded to bf16, up to 2^-9 of their size, which
    the shift adds twice over."""
    x = x.clone()
    x[:, d:d + 2] = 0
    top = torch.ops.mkldnn._linear_pointwise(x, kp, None, "none", [], "")[:, :m].amax(dim=-1).float()
    _put_shift(x, d, top + top.abs() / 256 + _EXP_MARGIN)
    return x


def _put_shift(x: torch.Tensor, d: int, t: torch.Tensor) -> None:
    """-t into columns d and d + 1 of the bf16 rows x: its bf16 value and the remainder (the product adds
    them in float32, so the shift is t to float32's precision)."""
    hi = t.to(x.dtype)
    x[..., d] = -hi
    x[..., d + 1] = -(t - hi.float())


def _compiling() -> bool:
    """True while torch.compile traces the model (torch.compiler.is_compiling: torch 2.3 and later)."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


@functools.cache
def _amx() -> bool:
    """True where torch runs bf16 products on AMX tiles (Intel Sapphire Rapids and later)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.cache
def _fused_exp_available() -> bool:
    """torch's oneDNN linear with a fused sigmoid, and oneDNN's bf16 kernels on this CPU (_attention_fused;
    packing_available asks for these and the weight reorders besides)."""
    try:
        return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    except (AttributeError, RuntimeError):
        return False


class RuntimeCrossAttention(CrossAttention):
    """CrossAttention whose attention is runtime.attention's (use_runtime_attention)."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, self.heads)


class RuntimeAttnBlock(AttnBlock):
    """The VAE's attention block with runtime.attention's attention (use_runtime_attention)."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, heads=1)


class RuntimeVisionAttention(VisionAttention):
    """BLIP's ViT attention with head_attention (use_runtime_attention)."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return head_attention(q, k, v)


class RuntimeTextAttention(TextAttention):
    """BLIP's decoder attention (self and cross) with head_attention (use_runtime_attention)."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return head_attention(q, k, v, mask)


_RUNTIME = {CrossAttention: RuntimeCrossAttention, AttnBlock: RuntimeAttnBlock, VisionAttention: RuntimeVisionAttention,
            TextAttention: RuntimeTextAttention}


def use_runtime_attention(network: nn.Module) -> int:
    """Give a network's attention layers (the UNet's, the VAE's, BLIP's) this module's attention, by swapping their class
    (module doc). CLIP's attention is causal, which always runs SDPA, and stays as it is. Returns how many layers
    were swapped."""
    return _swap(network, _RUNTIME)


def use_plain_attention(network: nn.Module) -> int:
    """Undo use_runtime_attention: the models' own SDPA again. Returns how many layers were swapped back."""
    return _swap(network, {swapped: original for original, swapped in _RUNTIME.items()})


def _swap(network: nn.Module, classes: dict[type, type]) -> int:
    count = 0
    for module in network.modules():
        if type(module) in classes:
            module.__class__ = classes[type(module)]
            count += 1
    return count
