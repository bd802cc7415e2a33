"""prepare(): a loaded model made ready to generate, within bf16 tolerance of the float32 reference."""

import numpy as np
import pytest
import torch

import plainsd
from tests.reference import perturb
from plainsd import runtime
from plainsd.pipeline import txt2img


def _model(seed=0):
    return perturb(plainsd.build("tiny", seed=seed), seed)  # no zero-initialised layer hides a difference


def _pixels(result):
    return np.asarray(result.images[0], dtype=np.float64)


def test_an_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown backend"):
        runtime.prepare(_model(), backend="tensorrt")


def test_bf16_path_within_tolerance_of_fp32():
    sd = _model()
    exact = txt2img(sd, "a red circle", steps=6, seed=3, cfg_scale=5)
    torch.set_flush_denormal(False)
    runtime.prepare(sd, precision="bf16")
    assert sd.unet.dtype == torch.bfloat16 and sd.vae.dtype == torch.bfloat16
    if torch.set_flush_denormal(True):  # (where the CPU can flush denormals) prepare turned it on
        torch.set_flush_denormal(False)
        runtime.prepare(sd)
        assert (torch.tensor(1e-39) * 1).item() == 0.0
    assert sd.unet.input_blocks[1][0].in_layers[2].weight.is_contiguous(memory_format=torch.channels_last)
    fast = txt2img(sd, "a red circle", steps=6, seed=3, cfg_scale=5)
    diff = np.abs(_pixels(exact) - _pixels(fast))
    assert diff.mean() < 3.0 and diff.max() < 64, (diff.mean(), diff.max())  # of 255
