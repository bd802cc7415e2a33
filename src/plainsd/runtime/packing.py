"""Packed weights: each convolution's and linear layer's weight reordered once into oneDNN's layout (inference).

On the eager path, torch hands oneDNN a plain weight at every convolution (and, in bf16, every linear layer),
and oneDNN copies it into its blocked layout each call: for the 1280- and 2560-channel convolutions of SD's
deepest levels that copy costs more than the arithmetic (benchmarks/conv_layouts.md). pack_weights reorders
each weight once, as OpenVINO and torch.compile's freezing do, and in bf16 fuses GEGLU's gelu and product into
its projection. oneDNN picks a convolution's layout for the input's shape, and a layout picked for one shape can
run another shape many times slower than the plain layer (benchmarks/conv_layouts.md), so a convolution is
packed at its first call and again whenever the input's shape changes (a new image size: one reorder per layer;
in bf16 a new batch size keeps the layout: _layout_key). In float32 the wide 3x3 convolutions on large inputs run
as Winograd's instead (runtime/winograd.py: uses_winograd), on filters transformed at their first such call
(kept) or, for the widest layers and a network that runs once a picture (the VAE: pack_weights' runs_once), at
each call.

In bf16, packed linears and convolutions give the plain layers' numbers bit for bit, except 1x1 convolutions,
which run as matrix products over the channels and agree to the last bit; in float32 all agree to the last bit
(torch's plain float32 convolution is not always oneDNN's), except those run as Winograd's (to rounding).
Float32 linear layers stay plain (MKL's sgemm is as fast as oneDNN's packed product), except GEGLU's projection
(faster packed at the deep levels), whose gelu and product stay torch's.

The ops are those torch.compile's CPU freezing uses (torch.ops.mkldnn): _reorder_*_weight gives an opaque
(torch._mkldnn layout) copy of a weight in oneDNN's blocked format, and _convolution_pointwise /
_linear_pointwise run on it, optionally with an activation ("gelu") or a product ("mul") fused in.

Class swapping. A layer is packed in place by giving it another class: `module.__class__ = PackedConv2d` (a
subclass of nn.Conv2d; PackedLinear, PackedGEGLU likewise). The model keeps its structure, its module names and
every reference to the layer; only the forward and where the weight lives change. The packed tensor replaces the
`weight` parameter (no second copy in memory) and the plain weight is made on demand: `.weight`, state_dict()
and LoRA see it as before. The packed ops have no autograd, so a call that needs gradients, or an input of
another dtype, runs the plain computation. The swap is undone (_unpack: the plain class and a plain `weight`
parameter again, equal bit for bit) before anything that works on the parameters themselves: `.to()`,
`.float()` and the like (nn.Module._apply), and a state-dict load (unpacked, loaded, packed again).
unpack_weights undoes it for a whole network. runtime/attention.py installs its attention by the same swap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import GEGLU
from .memory import release_freed_memory
from .winograd import keeps_filters, transform_filters, uses_winograd, winograd_conv2d

_MKLDNN_OPS = ("_reorder_convolution_weight", "_reorder_linear_weight", "_convolution_pointwise", "_linear_pointwise",
               "_is_mkldnn_bf16_supported")
# what pack_weights packs in each dtype. float32 linear layers stay with MKL's sgemm (as fast), except GEGLU's
# projection, packed whole ("GEGLU.proj": faster at the deep levels' few rows), its gelu and product in place
# after it (GEGLU.forward) rather than oneDNN's fused ones (slower there in float32; in bf16 the fused ones win)
_PACKED_TYPES = {torch.bfloat16: ("Conv2d", "Linear", "GEGLU"), torch.float32: ("Conv2d", "GEGLU.proj")}


def packing_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """True where torch's oneDNN ops for packed weights exist (and, for bf16, the CPU runs oneDNN's bf16
    kernels)."""
    if dtype not in _PACKED_TYPES:
        return False
    try:
        ops = torch.ops.mkldnn
        return (torch.backends.mkldnn.is_available() and all(hasattr(ops, name) for name in _MKLDNN_OPS)
                and (dtype != torch.bfloat16 or bool(ops._is_mkldnn_bf16_supported())))
    except (AttributeError, RuntimeError):
        return False


def _reorder(module: nn.Module, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The weight in oneDNN's layout for this layer (GEGLU's projection: its value and gate halves apart). A
    convolution's weight stays plain here: it is reordered at its first call, for the input's shape
    (PackedConv2d.forward)."""
    weight = weight.detach()
    if _pointwise(module):  # a 1x1 convolution is a matrix product over the channels
        return (torch.ops.mkldnn._reorder_linear_weight(weight.reshape(weight.shape[:2]).contiguous(), None),)
    if isinstance(module, nn.Conv2d):
        return (weight.contiguous(memory_format=torch.channels_last),)
    halves = weight.chunk(2) if getattr(module, "geglu", False) else (weight,)
    return tuple(torch.ops.mkldnn._reorder_linear_weight(h.contiguous(), None) for h in halves)


def _pointwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.padding == (0, 0) and module.dilation == (1, 1) and module.groups == 1)


class _Packed:
    """What PackedConv2d and PackedLinear share: the packed weight in self.packed, the plain one on demand."""

    packed: tuple[torch.Tensor, ...]

    @property
    def weight(self) -> torch.Tensor:  # the plain weight, a fresh copy (for LoRA, state_dict, the plain path)
        parts = [p.to_dense() if p.is_mkldnn else p.clone() for p in self.packed]
        dense = parts[0] if len(parts) == 1 else torch.cat(parts)
        if isinstance(self, nn.Conv2d):
            shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
            return dense.reshape(shape).contiguous(memory_format=torch.channels_last)
        return dense

    def _fast(self, x: torch.Tensor) -> bool:
        return x.dtype == self.packed[0].dtype and not (torch.is_grad_enabled() and x.requires_grad)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, *args, **kwargs):
        _unpack(self)  # the plain class again: the next line is nn.Module's own
        self._load_from_state_dict(*args, **kwargs)
        _pack(self)

    def _apply(self, fn, recurse=True):  # .to(), .float(), ...: on the plain weight
        _unpack(self)
        return self._apply(fn, recurse)


def _layout_key(x: torch.Tensor) -> tuple:
    """What of a convolution's input its packed layout is chosen for: the whole shape in float32, the shape without
    the batch size in bf16. oneDNN's bf16 layouts hardly depend on the batch (SD's convolutions packed for batch 2
    run batch 1 about as fast as packed for it, and the other way round), while float32 ones do; and repacking a
    whole UNet takes time that a sampler whose guidance stops part of the way (batch 2, then 1) would pay twice an
    image. Figures: benchmarks/conv_batch_layouts.md (conv_layouts.py --batch)."""
    return tuple(x.shape[1:]) if x.dtype == torch.bfloat16 else tuple(x.shape)


class PackedConv2d(_Packed, nn.Conv2d):
    packed_for: tuple | None = None  # the input shape the weight's layout was chosen for (_layout_key; once packed)
    winograd: torch.Tensor | None = None  # the transformed filters, once an input runs it as Winograd's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast(x) or x.ndim != 4:
            return self._conv_forward(x, self.weight, self.bias)
        kept = keeps_filters(self)
        if uses_winograd(self, x, filters_kept=kept):  # float32, 3x3, wide enough (runtime/winograd.py)
            if not kept:
                return winograd_conv2d(x, transform_filters(self.weight), self.bias)
            if self.winograd is None:
                self.winograd = transform_filters(self.weight)
            return winograd_conv2d(x, self.winograd, self.bias)
        if _pointwise(self):  # over the channels of the NHWC view (a view for channels-last input)
            y = torch.ops.mkldnn._linear_pointwise(x.permute(0, 2, 3, 1), self.packed[0], self.bias, "none", [], "")
            return y.permute(0, 3, 1, 2)
        padding = list(self.padding)
        if self.padding_mode != "zeros":  # circular (tiling): padded here as nn.Conv2d does, none in the convolution
            x, padding = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), [0, 0]
        if not self.packed[0].is_mkldnn or self.packed_for != _layout_key(x):  # oneDNN's layout for this shape (module doc)
            plain = self.weight if self.packed[0].is_mkldnn else self.packed[0]  # (a plain one as it is: no copy)
            self.packed = (torch.ops.mkldnn._reorder_convolution_weight(
                plain, padding, list(self.stride), list(self.dilation), self.groups, list(x.shape)),)
            self.packed_for = _layout_key(x)
            del plain
            # The weights replaced here (most of them in a model's first step) leave holes in malloc's heap that
            # keep_freed_memory would keep: handed back at once, they do not add to the step's peak memory (once
            # per repack: in the first step at a size only).
            release_freed_memory()
        return torch.ops.mkldnn._convolution_pointwise(x, self.packed[0], self.bias, padding, list(self.stride),
                                                       list(self.dilation), self.groups, "none", [], "")


class PackedLinear(_Packed, nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.packed) > 1 or not self._fast(x):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed[0], self.bias, "none", [], "")


class PackedGEGLU(GEGLU):
    """GEGLU with the gate's gelu and the value's product fused into the two halves of the projection:
    gelu(x W_gate + b_gate) first, then (x W_value + b_value) * that in one oneDNN call (no [N, 8C] tensor)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.proj
        if not (isinstance(proj, PackedLinear) and proj._fast(x)):
            return super().forward(x)
        value_bias, gate_bias = proj.bias.chunk(2) if proj.bias is not None else (None, None)
        gate = torch.ops.mkldnn._linear_pointwise(x, proj.packed[1], gate_bias, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise(x, gate, proj.packed[0], value_bias, "mul")

    def _apply(self, fn, recurse=True):  # .to(), .float(), ...: a plain GEGLU again (its projection unpacks too)
        _unpack(self)
        return self._apply(fn, recurse)


_PACKED = {nn.Conv2d: PackedConv2d, nn.Linear: PackedLinear, GEGLU: PackedGEGLU}


def _pack(module: nn.Module):
    if isinstance(module, GEGLU):
        module.__class__ = PackedGEGLU
        return
    packed = _reorder(module, module.weight)
    if not isinstance(module, _Packed):
        module._requires_grad = module.weight.requires_grad
        del module._parameters["weight"]
        module.__class__ = _PACKED[type(module)]
    module.packed = packed


def _unpack(module: nn.Module):
    if isinstance(module, PackedGEGLU):
        module.__class__ = GEGLU
    elif isinstance(module, _Packed):
        dense = module.weight
        module.__class__ = next(plain for plain, packed in _PACKED.items() if packed is type(module))
        del module.packed
        module.__dict__.pop("packed_for", None)
        module.__dict__.pop("winograd", None)
        weight = nn.Parameter(dense, requires_grad=module.__dict__.pop("_requires_grad", True))
        module._parameters = {"weight": weight, **module._parameters}  # first, as before (state_dict's order)


def _packs(kind: str, weight: torch.Tensor) -> bool:
    return kind in _PACKED_TYPES.get(weight.dtype, ()) and packing_available(weight.dtype)


def pack_weights(network: nn.Module, runs_once: bool = False) -> int:
    """Reorder the weights of a network's Conv2d and Linear layers once into oneDNN's layout (inference): in
    bf16 all of them (GEGLU's projection in its two halves), in float32 the convolutions and GEGLU's projection
    (_PACKED_TYPES). runs_once: a network that runs once a picture (the VAE), whose float32 convolutions make
    Winograd's filters at each call rather than keep them (runtime/winograd.py: keeps_filters); it stays so
    marked. Returns how many layers were packed."""
    count = 0
    for module in network.modules():
        if runs_once and isinstance(module, nn.Conv2d):
            module.keeps_winograd = False
        if isinstance(module, GEGLU) and type(module.proj) is nn.Linear and _packs("GEGLU", module.proj.weight):
            module.proj.geglu = True
            _pack(module.proj)
            _pack(module)
            count += 1
        elif isinstance(module, GEGLU) and type(module.proj) is nn.Linear and _packs("GEGLU.proj", module.proj.weight):
            module.proj.geglu = False  # whole (a bf16 model packed before and cast since has it True)
            _pack(module.proj)
            count += 1
        if type(module) in (nn.Conv2d, nn.Linear) and _packs(type(module).__name__, module.weight):
            if isinstance(module, nn.Conv2d) and isinstance(module.padding, str):  # "same", "valid" (circular: packed)
                continue
            _pack(module)
            count += 1
    return count


def unpack_weights(network: nn.Module) -> int:
    """Undo pack_weights: plain weights again, equal to the originals bit for bit."""
    count = 0
    for module in network.modules():
        count += isinstance(module, _Packed)
        _unpack(module)
    return count


def set_weight(module: nn.Module, value: torch.Tensor):
    """Give a layer a new weight (packed again when the layer is packed)."""
    if isinstance(module, _Packed):
        module.packed = _reorder(module, value.to(module.packed[0].dtype))
        module.__dict__.pop("winograd", None)  # made again from the new weight at the next call
    else:
        with torch.no_grad():
            module.weight.copy_(value)
