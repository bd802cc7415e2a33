"""Precision: bf16 where the CPU multiplies it natively, float32 elsewhere or on request."""

import pytest
import torch

from plainsd import runtime
from plainsd.runtime import precision


def test_choose_dtype(monkeypatch):
    assert runtime.choose_dtype("fp32") == torch.float32
    assert runtime.choose_dtype("bf16") == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    assert runtime.choose_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})  # bf16 would be emulated: slower
    assert runtime.choose_dtype("auto") == torch.float32
    with pytest.raises(ValueError, match="unknown precision 'fp8'; known: auto, bf16, fp16, fp32"):
        runtime.choose_dtype("fp8")
