"""Winograd's fast 3x3 convolution, F(4x4, 3x3): the float32 convolutions of a prepared model in a quarter of the
multiplications.

A 3x3 convolution with stride 1 computes each output pixel from 9 inputs per channel. Winograd's minimal
filtering algorithm (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2015) computes a 4x4
block of outputs from the 6x6 block of inputs around it with 36 multiplications per channel pair where the direct
convolution needs 144:

    Y = A^T [ (G g G^T) * (B^T d B) ] A        g: a 3x3 filter, d: a 6x6 input tile, *: elementwise

B^T (6x6), G (6x3) and A^T (4x6) are the fixed matrices of the interpolation points 0, 1, -1, 2, -2 and infinity.
Over many channels the elementwise products become matrix products: with U = G g G^T for every (input, output)
channel pair, a [36, C, K] tensor made once per layer, and V = B^T d B for every tile and input channel, the
output's transform of M[xi] = V[xi] @ U[xi] (36 products of [tiles, C] @ [C, K]) is the convolution. Those 36
products are MKL's sgemm, a quarter of the direct convolution's arithmetic; the transforms are small dense
products (36x36 and 16x36, the Kronecker squares of B^T and A^T) over the tiles.

The tiles are taken a few rows at a time (about 256 tiles a chunk, _TILES_PER_CHUNK), so that a chunk's tiles,
their transform and its products stay in the CPU's caches between the steps: the transforms read and write
2.25 times the input, and over a whole large input they would run at memory speed.

Where it is used (uses_winograd, one rule): convolutions that are 3x3, stride 1, padding 1, no groups or
dilation, with at least 128 input and output channels (narrower ones gain little), on float32 inputs, outside
training and graph tracing. U holds four times the layer's weights, so where it lives depends on the layer:
- a prepared UNet's (or ControlNet's) float32 layers (runtime/packing.py) of at most 1920 x 640 channels (the
  widest of SD's 640-channel level) keep U once made, on inputs of at least 32x32 pixels: for an SD UNet about
  1 GiB at any image size (mostly its first two levels).
- wider float32 layers (the 1280-channel level), those of a network that runs once or a few times a picture (the
  VAE, whose U, about 0.7 GiB for SD's, would only add to the decode's peak; a T2I-Adapter), and every layer
  whose fp16 weights are computed in float32 (runtime/storage.py: SDXL on CPUs without native bf16, whose point
  is memory) make U at each call and keep nothing; making it costs about what a few thousand positions'
  arithmetic saves, so only inputs of at least 2048 positions (batch x height x width) run it: with CFG, SD's
  1280-channel level at 1024x1024 (the upsampler into the 640-channel level at 512x512), SDXL's first two levels
  at 768x768 and all three at 1024x1024, every layer of the VAE's decode at 512x512.
The speed and the memory it costs are in docs/speed.md.

The numbers differ from the direct convolution's by rounding, a few times a float32 direct convolution's own (the
transforms add and scale by up to 25 before the products; tests/runtime/test_winograd.py bounds it). bf16 keeps
oneDNN's direct convolution: the transforms would magnify its rounding past bf16's precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import _compiling

_BT = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
       [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
_G = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
      [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
_AT = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]


def _kron_square(rows: list[list[float]]) -> torch.Tensor:
    """M kron M: applied to a flattened tile, the same as M @ tile @ M^T (float64; cast to the data's dtype)."""
    m = torch.tensor(rows, dtype=torch.float64)
    return torch.kron(m, m)


INPUT_TRANSFORM = _kron_square(_BT)    # [36, 36]
FILTER_TRANSFORM = _kron_square(_G)    # [36, 9]
OUTPUT_TRANSFORM = _kron_square(_AT)   # [16, 36]
_TILES_PER_CHUNK = 256
MIN_CHANNELS = 128
MAX_KEPT_CHANNEL_PAIRS = 1920 * 640  # in x out channels of a layer that may keep U
MIN_SIZE = 32  # height and width, where U is kept
MIN_POSITIONS_EACH_CALL = 2048  # batch x height x width, where U is made at each call


def keeps_filters(conv: nn.Conv2d) -> bool:
    """Whether a float32 layer that runs Winograd's convolution keeps U (module doc): not in a network that runs
    once a picture (pack_weights(runs_once=True) marks its layers), nor past MAX_KEPT_CHANNEL_PAIRS."""
    return getattr(conv, "keeps_winograd", True) and conv.in_channels * conv.out_channels <= MAX_KEPT_CHANNEL_PAIRS


def uses_winograd(conv: nn.Conv2d, x: torch.Tensor, filters_kept: bool = True) -> bool:
    """Whether this convolution runs as Winograd's on this input (module doc: the one rule); filters_kept:
    whether the layer keeps U once made (keeps_filters) or makes it at each call."""
    if not (x.dtype == torch.float32 and x.device.type == "cpu" and x.ndim == 4 and conv.kernel_size == (3, 3)
            and conv.stride == (1, 1) and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in conv.parameters())):
        return False  # training: the plain convolution and its gradients
    if torch.jit.is_tracing() or _compiling():  # a graph being made (OpenVINO's conversion): the plain convolution
        return False
    if filters_kept:
        return min(x.shape[-2:]) >= MIN_SIZE
    return x.shape[0] * x.shape[2] * x.shape[3] >= MIN_POSITIONS_EACH_CALL


def transform_filters(weight: torch.Tensor) -> torch.Tensor:
    """U = G g G^T for every filter: [K, C, 3, 3] -> [36, C, K] (float32, float64 for float64 weights), the
    right-hand sides of the 36 products."""
    out_channels, in_channels = weight.shape[:2]
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    flat = weight.detach().to(dtype).permute(2, 3, 1, 0).reshape(9, in_channels * out_channels)  # [9, C * K]
    return (FILTER_TRANSFORM.to(dtype) @ flat).view(36, in_channels, out_channels)


def winograd_conv2d(x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 3x3 convolution with stride 1 and zero padding 1: x [B, C, H, W] float32 (channels-last is fastest; or
    float64), filters from transform_filters. Returns [B, K, H, W], channels-last."""
    batch, _, height, width = x.shape
    out_channels = filters.shape[2]
    rows, cols = -(-height // 4), -(-width // 4)  # 4x4 output tiles down and across (the last ones cropped)
    pixels = x.permute(0, 2, 3, 1)  # [B, H, W, C]
    out = torch.empty(batch, rows, 4, cols, 4, out_channels, dtype=x.dtype)
    step = max(1, _TILES_PER_CHUNK // (batch * cols))
    for first in range(0, rows, step):
        last = min(rows, first + step)
        _tile_rows(pixels, filters, bias, first, last, out[:, first:last])
    out = out.view(batch, 4 * rows, 4 * cols, out_channels)[:, :height, :width].permute(0, 3, 1, 2)
    return out if (height, width) == (4 * rows, 4 * cols) else out.contiguous(memory_format=torch.channels_last)


def _tile_rows(pixels: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None, first: int, last: int,
               out: torch.Tensor):
    """Output tile rows first..last-1 of winograd_conv2d into out [B, last - first, 4, cols, 4, K]."""
    batch, height, width, channels = pixels.shape
    cols, out_channels = out.shape[3], out.shape[5]
    top, bottom = 4 * first - 1, 4 * last + 1  # the input rows these tiles read; zeros where outside the image
    part = pixels[:, max(top, 0):min(bottom, height)]
    part = F.pad(part, (0, 0, 1, 4 * cols + 1 - width, max(0, -top), max(0, bottom - height)))
    tiles = part.unfold(1, 6, 4).unfold(2, 6, 4)  # [B, rows, cols, C, 6, 6], overlapping views
    count = tiles.shape[0] * tiles.shape[1] * tiles.shape[2]
    flat = tiles.permute(4, 5, 0, 1, 2, 3).reshape(36, count * channels)  # the tiles' 36 positions first
    inputs = (INPUT_TRANSFORM.to(flat.dtype) @ flat).view(36, count, channels)  # V = B^T d B
    products = torch.bmm(inputs, filters)  # [36, tiles, K]
    result = OUTPUT_TRANSFORM.to(products.dtype) @ products.view(36, count * out_channels)
    result = result.view(4, 4, batch, -1, cols, out_channels)
    result = result.permute(2, 3, 0, 4, 1, 5)  # [B, rows, 4, cols, 4, K]
    if bias is None:
        out.copy_(result)
    else:
        torch.add(result, bias, out=out)
