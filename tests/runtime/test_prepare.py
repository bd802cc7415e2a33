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


def test_lcm_unet_on_the_bf16_path():
    """An LCM-distilled UNet's guidance embedding in bf16 with packed weights: within bf16 tolerance of float32,
    and the guidance scale still tells outputs apart."""
    from plainsd.runtime import packing
    from tests.test_configs import test_config

    sd = perturb(plainsd.build(test_config("tiny-lcm"), seed=0), 0)
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 900.0]), torch.randn(2, 77, 128, generator=g)
    with torch.no_grad():
        exact, other = sd.unet(x, t, ctx, guidance=7.0), sd.unet(x, t, ctx, guidance=1.0)
        runtime.prepare(sd, precision="bf16")
        if runtime.packing_available(torch.bfloat16):
            assert isinstance(sd.unet.time_embedding.cond_proj, packing._Packed)
        bf = sd.unet(x, t, ctx, guidance=7.0)
    error, effect = (bf - exact).abs().max(), (other - exact).abs().max()
    assert bf.dtype == torch.float32 and error < 0.05 * exact.abs().max() and error < 0.25 * effect, (error, effect)


@pytest.mark.parametrize("precision", ["bf16", "fp32", "fp16"])
def test_prepare_controlnet_runs_it_as_the_engine_runs_the_unet(precision):
    """The ControlNet takes the engine's dtype (fp16: fp16 weights computed in float32, as the UNet's),
    channels-last convolutions, the runtime's attention and packed weights (where torch has the ops), and gives
    the float32 residuals within that precision's tolerance."""
    from plainsd.models.controlnet import ControlNet
    from plainsd.runtime import packing

    sd = _model()
    cn = perturb(ControlNet(sd.config.unet), 1)
    g = torch.Generator().manual_seed(0)
    x, hint, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, 64, 64, generator=g), torch.randn(2, 77, 128, generator=g)
    t = torch.tensor([10.0, 900.0])
    with torch.no_grad():
        exact = sd.unet(x, t, ctx, control=cn(x, hint, t, ctx))
        engine = runtime.prepare(sd, precision=precision)
        assert runtime.prepare_controlnet(cn, like=engine) is cn and cn.dtype == sd.unet.dtype
        assert cn.input_hint_block[2].weight.is_contiguous(memory_format=torch.channels_last)
        conv = cn.input_blocks[1][0].in_layers[2]
        if precision == "fp16":
            assert runtime.half_stored(cn) and isinstance(conv, runtime.HalfStoredConv2d)
            assert conv.weight.dtype == torch.float16 and cn.dtype == torch.float32
        elif runtime.packing_available(cn.dtype):
            assert isinstance(conv, packing._Packed)
        got = engine.unet(x, t, ctx, control=cn(x, hint, t, ctx))
        runtime.prepare_controlnet(cn, like=engine)  # again: no harm
        again = engine.unet(x, t, ctx, control=cn(x, hint, t, ctx))
    assert runtime.use_plain_attention(cn) > 0  # (its attention was the runtime's)
    tol = {"bf16": 0.05, "fp16": 0.005, "fp32": 1e-4}[precision]
    assert (got - exact).abs().max() <= tol * exact.abs().max() and torch.allclose(again, got, rtol=0, atol=1e-6)


def test_prepare_controlnet_readies_a_t2i_adapter_too():
    from plainsd.config import AdapterConfig
    from plainsd.models.t2i_adapter import T2IAdapter

    sd, adapter = _model(), perturb(T2IAdapter(AdapterConfig(channels=(32, 64))), 2)
    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = adapter(hint)
        runtime.prepare_controlnet(adapter, like=runtime.prepare(sd, precision="bf16"))
        got = adapter(hint)
    assert adapter.dtype == torch.bfloat16
    assert all((g.float() - e).abs().max() <= 0.03 * e.abs().max() for g, e in zip(got, exact))
