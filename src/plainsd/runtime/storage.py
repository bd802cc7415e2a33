"""Half-size weights computed in float32: fp16 storage for CPUs without native bf16.

On a CPU without avx512_bf16 or AMX (AVX2 and older AVX-512) bf16 arithmetic is emulated and slower than
float32, and half precision arithmetic is slower still; but an SDXL model's float32 weights (14 GB with its two
text encoders) alone exceed the 12 GB a 1024x1024 picture should fit in. So the weights of its linear and
convolution layers (97% of SDXL's numbers; the rest is mostly the text towers' token embeddings) stay in the
file's fp16, and each layer casts its weight to float32 when it runs: the activations, the arithmetic and the
results are float32, as on the float32 path, and only the weights are rounded to fp16 (as an fp16 file already
is). The cast costs one pass over the weights per network call.

One kind of layer is the exception: GEGLU's projections (the feed-forward's first layer, 0.8 billion of the SDXL
UNet's 2.6 billion numbers) become float32 whole, 1.5 GiB more. runtime.prepare then packs them into oneDNN's
layout once, as on the float32 path; cast at every call, they would be cast and then packed again by MKL, and
they run at the deep levels' few rows, where that costs most. With them the fp16 path comes within a few percent
of float32 weights at SDXL's sizes (docs/sdxl.md, "AVX2 kernels"), and a 1024x1024 picture stays within 12 GB.

compute_in_float32 turns this on for a network loaded in fp16, by the class swap runtime/packing.py describes:
nn.Linear and nn.Conv2d become HalfStoredLinear and HalfStoredConv2d (their forward alone changes), and every
other parameter (biases, norms, embeddings: small; GEGLU's projections) becomes float32, so that the network's
dtype, which the models read from a bias, says float32 and the denoiser hands it float32 inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.layers import GEGLU
from .winograd import transform_filters, uses_winograd, winograd_conv2d


class HalfStoredLinear(nn.Linear):
    """nn.Linear whose weight is kept in fp16 and cast to the input's dtype at each call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)


class HalfStoredConv2d(nn.Conv2d):
    """nn.Conv2d whose weight is kept in fp16 and cast to the input's dtype at each call (or, for wide 3x3
    layers on large inputs, transformed for Winograd's convolution at each call)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if uses_winograd(self, x, filters_kept=False):
            return winograd_conv2d(x, transform_filters(self.weight), self.bias)  # (runtime/winograd.py)
        return self._conv_forward(x, self.weight.to(x.dtype), self.bias)


_HALF_STORED = {nn.Linear: HalfStoredLinear, nn.Conv2d: HalfStoredConv2d}


def compute_in_float32(network: nn.Module) -> int:
    """Keep a network's fp16 linear and convolution weights in fp16 and run it in float32 (module doc): those
    layers' classes swapped, every other fp16 parameter and buffer (GEGLU's projections among them) cast to
    float32. Returns how many layers keep fp16 weights. A network in another dtype is left as it is (0)."""
    float32_layers = {id(m.proj) for m in network.modules() if isinstance(m, GEGLU)}
    count = 0
    for module in network.modules():
        if (type(module) in _HALF_STORED and module.weight.dtype == torch.float16
                and id(module) not in float32_layers):
            module.__class__ = _HALF_STORED[type(module)]
            count += 1
    for module in network.modules():
        half_weight = isinstance(module, tuple(_HALF_STORED.values()))
        for name, param in module.named_parameters(recurse=False):
            if param.dtype == torch.float16 and not (half_weight and name == "weight"):
                param.data = param.data.float()
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.dtype == torch.float16:
                module._buffers[name] = buffer.float()
    return count


def half_stored(network: nn.Module) -> bool:
    """True where compute_in_float32 has given the network fp16 weights computed in float32."""
    return any(isinstance(m, (HalfStoredLinear, HalfStoredConv2d)) for m in network.modules())
