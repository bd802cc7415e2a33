"""Where and how the networks run on a CPU: precision, threads, memory format, and the compiled path.

    sd = plainsd.load("model.safetensors", dtype=choose_dtype("auto"))   # bf16 where the CPU has it
    prepare(sd, backend="openvino")                                       # optional compiled UNet

Precision. "auto" picks bfloat16 where the CPU multiplies bf16 natively (the avx512_bf16 or AMX
instructions: about 3x the float32 speed of SD's convolutions and matmuls here) and float32 elsewhere,
where bf16 would be emulated and slower. The weights and activations of the networks take that dtype;
latents, sigmas and all sampler maths stay float32 (the denoiser casts at the network's door).

Compiled path. backend="openvino" converts the UNet once with openvino.convert_model, keeps the
converted model on disk (keyed by a fingerprint of the weights, the config and the precision), and
runs it with OpenVINO's CPU plugin; compiled blobs go to the same cache, so a second run starts in
seconds. The UNet's own parameters stay the truth: when they change (a LoRA applied for one run, say)
the compiled model is looked up again for the new weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import warnings
from pathlib import Path

import torch

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


def prepare(sd, backend: str = "eager", cache_dir: str | os.PathLike | None = None, precision: str | None = None):
    """Get a loaded model ready to generate: channels-last convolutions and the chosen backend.

    precision: cast the networks (None keeps the dtype the model was loaded in).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if precision is not None:
        sd.to(choose_dtype(precision))
    # oneDNN's convolutions run fastest on NHWC; plain float32 too, so this holds for every precision.
    sd.unet.to(memory_format=torch.channels_last)
    sd.vae.to(memory_format=torch.channels_last)
    sd.backend = OpenVINOUNet(sd.unet, cache_dir) if backend == "openvino" else None
    return sd


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


class OpenVINOUNet:
    """The UNet through OpenVINO: converted once per weights, compiled once per input shape, cached on disk."""

    def __init__(self, unet: torch.nn.Module, cache_dir: str | os.PathLike | None = None):
        try:
            import openvino as ov
        except ImportError:
            raise RuntimeError("the openvino backend needs the openvino package: pip install 'plainsd[openvino]'") from None
        self.ov = ov
        self.unet = unet
        self.cache = Path(cache_dir) if cache_dir else default_cache_dir() / "openvino"
        self.core = ov.Core()
        # compiled blobs apart per precision (OpenVINO 2026.4 gave a bf16 compile the f32 blob of a model)
        self.core.set_property({"CACHE_DIR": str(self.cache / f"blobs-{self.precision}")})
        self._versions = None
        self._model = None
        self._compiled: dict[tuple, object] = {}

    @property
    def precision(self) -> str:
        return "bf16" if self.unet.dtype == torch.bfloat16 else "f32"

    def _current_versions(self) -> tuple:
        return tuple(p._version for p in self.unet.parameters())  # in-place changes (LoRA) bump these

    def _load(self, example: tuple[torch.Tensor, ...]):
        cfg = getattr(self.unet, "config", None)
        key = fingerprint(self.unet, json.dumps(cfg.__dict__ if cfg is not None else {}, default=str) + self.precision)
        xml = self.cache / key / "unet.xml"
        if xml.is_file():
            self._model = self.core.read_model(str(xml))
        else:
            # Copy the weights (share_weights=False): with shared memory, the module's own later changes (its
            # channels-last copies, made right after) reached the converted model as NaNs in OpenVINO 2026.4.
            self.unet.to(memory_format=torch.contiguous_format)
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants: fine per shape
                    model = self.ov.convert_model(self.unet, example_input=example, share_weights=False)
            finally:
                self.unet.to(memory_format=torch.channels_last)
            tmp = xml.parent.with_name(f"{key}.{os.getpid()}.tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            self.ov.save_model(model, str(tmp / "unet.xml"), compress_to_fp16=False)
            if xml.parent.exists():  # another process got there first
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, xml.parent)
            del model
            # Compile what later runs will read: OpenVINO keys its compiled blobs by a hash of the model, and the
            # converted model hashes differently from the same model read back, so compiling the converted one
            # left the second run to compile again (8 s more start-up at 512x512 with SD1.5's UNet).
            self._model = self.core.read_model(str(xml))
        self._compiled = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.float32).reshape(-1).expand(x.shape[0]).contiguous()
        x32, c32 = x.float().contiguous(), context.float().contiguous()
        if self._model is None or self._versions != self._current_versions():
            self._load((x32, t, c32))
            self._versions = self._current_versions()
        shape = (tuple(x32.shape), tuple(t.shape), tuple(c32.shape))
        request = self._compiled.get(shape)
        if request is None:
            model = self._model.clone()
            model.reshape({i: list(s) for i, s in enumerate(shape)})
            config = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY"}
            config["INFERENCE_NUM_THREADS"] = torch.get_num_threads()  # as many as torch uses (--threads)
            request = self.core.compile_model(model, "CPU", config).create_infer_request()
            self._compiled[shape] = request
        out = request.infer([x32.numpy(), t.numpy(), c32.numpy()])
        return torch.from_numpy(out[0].copy()).to(x.dtype)
