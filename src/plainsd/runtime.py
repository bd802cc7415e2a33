"""Where and how the networks run on a CPU: precision, threads, memory format, and the compiled path.

    sd = plainsd.load("model.safetensors", dtype=choose_dtype("auto"))   # bf16 where the CPU has it
    prepare(sd, backend="openvino")                                       # optional compiled UNet

Precision. "auto" picks bfloat16 where the CPU multiplies bf16 natively (the avx512_bf16 or AMX
instructions: about 3x the float32 speed of SD's convolutions and matmuls here) and float32 elsewhere,
where bf16 would be emulated and slower. The weights and activations of the networks take that dtype;
latents, sigmas and all sampler maths stay float32 (the denoiser casts at the network's door).

Packed weights. On the eager path, torch hands oneDNN a plain weight at every convolution (and, in bf16, every
linear layer), and oneDNN copies it into its blocked layout each call: for the 1280- and 2560-channel
convolutions of SD's deepest levels that copy costs more than the arithmetic (in float32 on an AVX2 CPU, a
1280-channel 3x3 convolution at 4x4 takes 48 ms plain and 9 packed in benchmarks/conv_layouts.md). prepare()
reorders each weight once (pack_weights), as OpenVINO and torch.compile's freezing do, and in bf16 fuses GEGLU's
gelu and product into its projection. oneDNN picks a convolution's layout for the input's shape, and a layout
picked for one shape can run another 10-100x slower than the plain layer (a 1920-channel one packed for 32x32
and run at 8x8: 980 ms against 89), so a convolution is packed at its first call and again whenever the input's
shape changes (a new image size: one reorder per layer; in bf16 a new batch size keeps the layout: _layout_key).
In bf16, packed linears and convolutions give the plain layers' numbers bit for bit, except 1x1 convolutions,
which run as matrix products over the channels and agree to the last bit; in float32 all agree to the last bit
(torch's plain float32 convolution is not always oneDNN's). Float32 linear layers stay plain (MKL's sgemm is as
fast as oneDNN's packed product), except GEGLU's projection (faster packed at the deep levels), whose gelu and
product stay torch's.

Compiled path. backend="openvino" converts the UNet once with openvino.convert_model, keeps the
converted model on disk (keyed by a fingerprint of the weights, the config, the precision and the code
that builds the graph: code_version), and
runs it with OpenVINO's CPU plugin; the compiled model of each input shape is exported beside it, so
that a second run maps it from the file and starts in seconds (nothing converted, compiled or hashed).
The UNet's own parameters stay the truth: when they change (a LoRA applied for one run, say) the
compiled model is looked up again for the new weights.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .models.layers import GEGLU
from .weights import load_tiny_decoder

PRECISIONS = ("auto", "bf16", "fp32")
BACKENDS = ("eager", "openvino")
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16() -> bool:
    """True where the CPU computes in bfloat16 natively (x86 avx512_bf16 or AMX; Apple/ARM bf16 not assumed)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"}) and platform.machine() in ("x86_64", "AMD64")


def choose_dtype(precision: str = "auto") -> torch.dtype:
    """The networks' dtype for a precision setting: "auto" (bf16 where native, else fp32), "bf16" or "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    return _DTYPES[precision]


class Engine:
    """A model ready to generate on this machine, and what runs its networks: what the pipeline is given.

    engine.sd is the model; engine.unet is what a sampler calls as unet(x, t, context): the model's own UNet
    (backend "eager", its weights packed by prepare) or the UNet compiled by OpenVINO. tiny_decoder() is fast
    mode's TAESD decoder: the one given, else the file beside the checkpoint (loaded on first use), else None.
    """

    def __init__(self, sd, backend: str = "eager", unet=None, tiny_decoder=None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
        self.sd, self.backend = sd, backend
        self.unet = unet if unet is not None else sd.unet
        self._tiny = tiny_decoder

    def tiny_decoder(self):
        if self._tiny is None and self.sd.tiny_decoder_path:
            self._tiny = load_tiny_decoder(self.sd.tiny_decoder_path, self.sd.vae.dtype)
        return self._tiny

    def use_tiny_decoder(self, decoder, name: str = "the tiny decoder") -> None:
        """Decode fast mode's pictures with this TAESD decoder (checked against the model's latents)."""
        if decoder.latent_channels != self.sd.config.vae.z_channels:
            raise ValueError(f"{name} decodes {decoder.latent_channels}-channel latents; this model's "
                             f"have {self.sd.config.vae.z_channels}")
        self._tiny = decoder.to(self.sd.vae.dtype)

    def __repr__(self) -> str:
        return f"Engine({self.sd!r}, backend={self.backend!r})"


def prepare(sd, backend: str = "eager", cache_dir: str | os.PathLike | None = None,
            precision: str | None = None) -> Engine:
    """Get a loaded model ready to generate: channels-last convolutions, the chosen backend, and on the eager
    path the weights of the UNet and the VAE packed for oneDNN (pack_weights). The eager bf16 path also
    turns on torch.set_flush_denormal for the process (denormal floats become zero), and every path asks the C
    library to keep freed memory for reuse (keep_freed_memory). Returns the Engine the pipeline runs.

    precision: cast the networks (None keeps the dtype the model was loaded in).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if precision is not None:
        sd.to(choose_dtype(precision))
    # oneDNN's convolutions run fastest on NHWC; plain float32 too, so this holds for every precision.
    sd.unet.to(memory_format=torch.channels_last)
    sd.vae.to(memory_format=torch.channels_last)
    unet = OpenVINOUNet(sd.unet, cache_dir) if backend == "openvino" else None
    if backend == "eager":
        pack_weights(sd.unet)  # (what the dtype and this torch allow: pack_weights)
        pack_weights(sd.vae)
    if backend == "eager" and sd.unet.dtype == torch.bfloat16:
        # bf16 inference: numbers below float32's 1.2e-38 carry nothing here, and the fused attention's
        # exponentials that underflow into that range run slower as denormals (models/layers._attention_fused)
        torch.set_flush_denormal(True)
    keep_freed_memory()
    return Engine(sd, backend, unet)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts
_TRIM_THRESHOLD = 512 << 20


_kept = False  # keep_freed_memory took effect


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks of up to 32 MB for the next allocation instead of handing them
    back to the kernel (for the whole process). By default it maps blocks of 128 KB and up afresh (mmap) and
    unmaps them when freed, and trims its heap: every UNet step's tensors then come back as new pages that the
    kernel must fault in and zero, 100k+ page faults per 512x512 step with CFG (about 4% of the step on the
    2-core machine, in processes alternating with and without). The cost: up to 512 MB of freed memory stays
    with the process (the pipeline hands it back before decoding: release_freed_memory). Returns False (and
    changes nothing) where the C library is not glibc."""
    global _kept
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: other C libraries' mallopt takes other parameters
    except (OSError, AttributeError):
        return False
    _kept = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _kept


def release_freed_memory() -> None:
    """Hand the freed memory that keep_freed_memory keeps back to the kernel (glibc's malloc_trim). The
    pipeline calls it before the VAE decodes: the decoder's large blocks (32 MB and up) are mapped afresh
    anyway, and the sampling's kept blocks would add to the peak (0.1-0.2 GB at 512x512)."""
    if _kept:
        ctypes.CDLL(None).malloc_trim(0)


# ---- packed weights (eager inference) ---------------------------------------------------------------------------
# torch.ops.mkldnn holds the oneDNN calls torch.compile's CPU freezing uses: _reorder_*_weight gives an opaque
# (torch._mkldnn layout) copy of a weight in oneDNN's blocked format, and _convolution_pointwise /
# _linear_pointwise run on it, optionally with an activation ("gelu") or a product ("mul") fused in. The packed
# tensor replaces the plain weight (no second copy in memory); state_dict(), .weight and .to() see the
# plain weight again. The packed ops have no autograd, so a call that needs gradients, or an input of another
# dtype, goes the plain way.

_MKLDNN_OPS = ("_reorder_convolution_weight", "_reorder_linear_weight", "_convolution_pointwise", "_linear_pointwise",
               "_is_mkldnn_bf16_supported")
# what pack_weights packs in each dtype. float32 linear layers stay with MKL's sgemm (as fast), except GEGLU's
# projection, packed whole ("GEGLU.proj": 10-40% faster at the deep levels' 32-512 rows), its gelu and product
# in place after it (GEGLU.forward) rather than oneDNN's fused ones (10-20% slower there on 2 AVX2 cores; in
# bf16 the fused ones win)
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
        _unpack(self)
        self._load_from_state_dict(*args, **kwargs)
        _pack(self)

    def _apply(self, fn, recurse=True):  # .to(), .float(), ...: on the plain weight
        _unpack(self)
        return self._apply(fn, recurse)


def _layout_key(x: torch.Tensor) -> tuple:
    """What of a convolution's input its packed layout is chosen for: the whole shape in float32, the shape without
    the batch size in bf16. oneDNN's bf16 layouts hardly depend on the batch (SD's convolutions packed for batch 2
    run batch 1 about as fast as packed for it, and the other way round: at most 1.41x slower, one small layer, with
    AMX; 1.15x with oneDNN held to AVX-512 bf16), while float32 ones held to AVX2 do (up to 3.7x); and a repack of
    a whole UNet costs 1-1.7 s (SD1.5 at 512, AMX), which a sampler whose guidance stops part of the way (batch 2,
    then 1) would pay twice an image. Figures: benchmarks/conv_batch_layouts.md (conv_layouts.py --batch)."""
    return tuple(x.shape[1:]) if x.dtype == torch.bfloat16 else tuple(x.shape)


class PackedConv2d(_Packed, nn.Conv2d):
    packed_for: tuple | None = None  # the input shape the weight's layout was chosen for (_layout_key; once packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast(x) or x.ndim != 4:
            return self._conv_forward(x, self.weight, self.bias)
        if _pointwise(self):  # over the channels of the NHWC view (a view for channels-last input)
            y = torch.ops.mkldnn._linear_pointwise(x.permute(0, 2, 3, 1), self.packed[0], self.bias, "none", [], "")
            return y.permute(0, 3, 1, 2)
        if not self.packed[0].is_mkldnn or self.packed_for != _layout_key(x):  # oneDNN's layout for this shape (module doc)
            plain = self.weight if self.packed[0].is_mkldnn else self.packed[0]  # (a plain one as it is: no copy)
            self.packed = (torch.ops.mkldnn._reorder_convolution_weight(
                plain, list(self.padding), list(self.stride), list(self.dilation), self.groups, list(x.shape)),)
            self.packed_for = _layout_key(x)
            del plain
            # The weights replaced here (most of them in a model's first step) leave holes in malloc's heap that
            # keep_freed_memory would keep: handed back at once, a 512x512 SD1.5 step peaks at 3.2 GB instead of
            # 3.5 (bf16, 2-core AMX machine; a few ms per repack, in the first step at a size only).
            release_freed_memory()
        return torch.ops.mkldnn._convolution_pointwise(x, self.packed[0], self.bias, list(self.padding), list(self.stride),
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
        weight = nn.Parameter(dense, requires_grad=module.__dict__.pop("_requires_grad", True))
        module._parameters = {"weight": weight, **module._parameters}  # first, as before (state_dict's order)


def _packs(kind: str, weight: torch.Tensor) -> bool:
    return kind in _PACKED_TYPES.get(weight.dtype, ()) and packing_available(weight.dtype)


def pack_weights(network: nn.Module) -> int:
    """Reorder the weights of a network's Conv2d and Linear layers once into oneDNN's layout (inference): in
    bf16 all of them (GEGLU's projection in its two halves), in float32 the convolutions and GEGLU's projection
    (_PACKED_TYPES). Returns how many layers were packed."""
    count = 0
    for module in network.modules():
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
            if isinstance(module, nn.Conv2d) and (module.padding_mode != "zeros" or isinstance(module.padding, str)):
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
    else:
        with torch.no_grad():
            module.weight.copy_(value)


def default_cache_dir() -> Path:
    base = os.environ.get("PLAINSD_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                           os.path.expanduser("~/.cache"), "plainsd")
    return Path(base)


def fingerprint(module: torch.nn.Module, extra: str = "") -> str:
    """A short hash of a module's weights (a strided sample of every tensor, with names, shapes and dtypes)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(extra.encode())
    for name, t in module.state_dict().items():
        flat = t.detach().reshape(-1)
        stride = max(flat.numel() // 512, 1)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat[::stride].float().numpy().tobytes())
    return h.hexdigest()


def code_version() -> str:
    """A short hash of the source of plainsd's networks (the models package) and torch's version: what a
    conversion of a module depends on besides its weights. An OpenVINO conversion made by other code (a graph
    that has changed since) is not reused."""
    h = hashlib.blake2b(torch.__version__.encode(), digest_size=8)
    for source in sorted(Path(__file__).with_name("models").glob("*.py")):
        h.update(source.name.encode() + source.read_bytes())
    return h.hexdigest()


def cache_limit() -> int:
    """Bytes the OpenVINO cache may hold (PLAINSD_OPENVINO_CACHE_GB, default 20: four or five SD1.5-size models)."""
    value = os.environ.get("PLAINSD_OPENVINO_CACHE_GB", "20")
    try:
        gb = float(value)
    except ValueError:
        raise ValueError(f"PLAINSD_OPENVINO_CACHE_GB must be a number of gigabytes, not {value!r}") from None
    return int(gb * 2**30)


def prune_cache(root: Path, limit: int, keep: str) -> list[str]:
    """Delete the least recently used models of the cache until it holds at most `limit` bytes; `keep` (the model
    in use) stays whatever its size. A model's folder is touched each time a run uses it. Returns what went."""
    entries = []
    for folder in root.iterdir() if root.is_dir() else ():
        if folder.is_dir() and not folder.name.endswith(".tmp"):
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            entries.append((folder.stat().st_mtime, folder.name, size))
    total = sum(size for _, _, size in entries)
    removed = []
    for _, name, size in sorted(entries):
        if total <= limit:
            break
        if name != keep:
            shutil.rmtree(root / name, ignore_errors=True)
            total -= size
            removed.append(name)
    return removed


class OpenVINOUNet:
    """The UNet through OpenVINO: converted once per weights, compiled once per input shape, both kept on disk.

    cache/<fingerprint>/unet.xml is the converted model (to compile for a new shape); beside it, one exported
    compiled model per input shape, thread count and OpenVINO version, which a later run imports directly (mapped
    from the file) without reading or hashing the converted model again. The cache keeps the most recently used
    models up to PLAINSD_OPENVINO_CACHE_GB (20 by default; each LoRA combination is a model of its own)."""

    def __init__(self, unet: torch.nn.Module, cache_dir: str | os.PathLike | None = None):
        try:
            import openvino as ov
        except ImportError:
            raise RuntimeError("the openvino backend needs the openvino package: pip install 'plainsd[openvino]'") from None
        self.ov = ov
        self.unet = unet
        self.cache = Path(cache_dir) if cache_dir else default_cache_dir() / "openvino"
        self.core = ov.Core()
        self._versions = None
        self._key: str | None = None
        self._model = None
        self._compiled: dict[tuple, object] = {}

    @property
    def precision(self) -> str:
        return "bf16" if self.unet.dtype == torch.bfloat16 else "f32"

    def _current_versions(self) -> tuple:
        return tuple(p._version for p in self.unet.parameters())  # in-place changes (LoRA) bump these

    def _converted(self, example: tuple[torch.Tensor, ...]):
        """The converted model of the current weights: read from the cache, or converted and saved there."""
        xml = self.cache / self._key / "unet.xml"
        if not xml.is_file():
            # Copy the weights (share_weights=False): with shared memory, the module's own later changes (its
            # channels-last copies, made right after) reached the converted model as NaNs in OpenVINO 2026.4.
            self.unet.to(memory_format=torch.contiguous_format)
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants: fine per shape
                    model = self.ov.convert_model(self.unet, example_input=example, share_weights=False)
            finally:
                self.unet.to(memory_format=torch.channels_last)
            tmp = xml.parent.with_name(f"{self._key}.{os.getpid()}.tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            self.ov.save_model(model, str(tmp / "unet.xml"), compress_to_fp16=False)
            del model
            if xml.parent.exists():  # another process got there first
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, xml.parent)
        return self.core.read_model(str(xml))

    def _compile(self, shape: tuple, example: tuple[torch.Tensor, ...]):
        config = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": torch.get_num_threads()}  # as many as torch uses (--threads)
        dims = "_".join("x".join(map(str, s)) for s in shape)
        blob = self.cache / self._key / f"{dims}-{config['INFERENCE_NUM_THREADS']}t-ov{self.ov.__version__.split('-')[0]}.blob"
        if blob.is_file():
            try:
                mapped = np.memmap(blob, dtype=np.uint8, mode="c")  # copy-on-write: OpenVINO wants a writeable array
                compiled = self.core.import_model(self.ov.Tensor(mapped, shared_memory=True), "CPU", config)
                return compiled, mapped  # (the mapping lives as long as the compiled model)
            except Exception:  # noqa: BLE001 - a blob this OpenVINO cannot read: compile afresh and replace it
                pass
        if self._model is None:
            self._model = self._converted(example)
        model = self._model.clone()
        model.reshape({i: list(s) for i, s in enumerate(shape)})
        compiled = self.core.compile_model(model, "CPU", config)
        tmp = blob.with_name(f"{blob.name}.{os.getpid()}.tmp")
        try:
            exported = compiled.export_model()  # bytes, or an io.BytesIO in OpenVINO 2026.4
            with open(tmp, "wb") as f:
                f.write(exported.getbuffer() if hasattr(exported, "getbuffer") else exported)
            os.replace(tmp, blob)
        except OSError as e:  # a full or read-only disk costs the next run a compile, not this run its picture
            tmp.unlink(missing_ok=True)
            warnings.warn(f"plainsd: could not keep the compiled model in {blob.parent}: {e}")
        else:
            try:
                prune_cache(self.cache, cache_limit(), keep=self._key)
            except OSError:  # another run pruning the same cache at the same moment: its business
                pass
        return compiled, None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.float32).reshape(-1).expand(x.shape[0]).contiguous()
        x32, c32 = x.float().contiguous(), context.float().contiguous()
        if self._key is None or self._versions != self._current_versions():
            cfg = getattr(self.unet, "config", None)
            self._key = fingerprint(self.unet, json.dumps(cfg.__dict__ if cfg is not None else {}, default=str)
                                    + self.precision + code_version())
            self._versions = self._current_versions()
            self._model, self._compiled = None, {}
            try:
                os.utime(self.cache / self._key)  # its last use, for pruning
            except OSError:  # not in the cache (yet)
                pass
        shape = (tuple(x32.shape), tuple(t.shape), tuple(c32.shape))
        if shape not in self._compiled:
            compiled, mapped = self._compile(shape, (x32, t, c32))
            self._compiled[shape] = (compiled.create_infer_request(), mapped)
        out = self._compiled[shape][0].infer([x32.numpy(), t.numpy(), c32.numpy()])
        return torch.from_numpy(out[0].copy()).to(x.dtype)
