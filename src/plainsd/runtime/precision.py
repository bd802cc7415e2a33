"""The networks' number format: bfloat16 where the CPU multiplies it natively, float32 elsewhere; SDXL's weights
in fp16 computed in float32 where bf16 is not native.

bf16 runs SD's convolutions and matrix products several times faster than float32 where the CPU has the
avx512_bf16 or AMX instructions (benchmarks/results.md, benchmarks/results-amx.md); without them it is
emulated and slower than float32. The weights and activations of the networks take the chosen dtype; latents,
sigmas and all sampler maths stay float32 (the denoiser casts at the network's door).

"fp16" is storage, not arithmetic: the model is loaded with fp16 weights and runtime.prepare makes its layers
compute in float32 (runtime/storage.py). "auto" takes it for SDXL-family models on CPUs without native bf16,
whose float32 weights alone would not leave a 1024x1024 picture within 12 GB.
"""

from __future__ import annotations

import platform

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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


def cpu_name() -> str:
    """The CPU's model name as Linux reports it (the machine's architecture where /proc/cpuinfo does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() or "unknown CPU"


def native_bf16() -> bool:
    """True where the CPU computes in bfloat16 natively (x86 avx512_bf16 or AMX; Apple/ARM bf16 not assumed)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"}) and platform.machine() in ("x86_64", "AMD64")


def choose_dtype(precision: str = "auto", config=None) -> torch.dtype:
    """The dtype to load a model's weights in for a precision setting: "auto" (bf16 where native; else fp16
    storage computed in float32 for an SDXL-family model, whose config says so, and float32 for the others),
    "bf16", "fp16" (stored, computed in float32) or "fp32". config: the model's ModelConfig (weights.read_config),
    where known."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if precision == "auto":
        if native_bf16():
            return torch.bfloat16
        return torch.float16 if getattr(config, "sdxl", "") else torch.float32
    return _DTYPES[precision]
