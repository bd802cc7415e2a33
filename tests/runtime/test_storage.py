"""fp16 storage computed in float32 (runtime/storage.py): how SDXL runs on CPUs without native bf16."""

import copy

import numpy as np
import pytest
import torch

import plainsd
from plainsd import pipeline, runtime, weights
from plainsd.models.layers import GEGLU
from plainsd.runtime import HalfStoredConv2d, HalfStoredLinear, precision
from tests.reference import perturb


@pytest.fixture(scope="module")
def sdxl():
    return perturb(plainsd.build("tiny-sdxl", seed=0), 0)


def _cpu(monkeypatch, flags):
    monkeypatch.setattr(precision, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")


def test_auto_picks_by_cpu_class_and_family(monkeypatch):
    """avx512_bf16 or AMX: bf16 for every model; AVX2 only: fp16 storage for SDXL (base and refiner), float32 for
    SD 1.x / 2.x; explicit settings win on any CPU."""
    sdxl, refiner, sd15 = plainsd.preset("tiny-sdxl"), plainsd.preset("tiny-sdxl-refiner"), plainsd.preset("tiny")
    _cpu(monkeypatch, {"avx2", "fma", "avx512f", "avx512_bf16"})
    assert [runtime.choose_dtype("auto", c) for c in (sdxl, refiner, sd15, None)] == [torch.bfloat16] * 4
    _cpu(monkeypatch, {"avx2", "fma"})
    assert [runtime.choose_dtype("auto", c) for c in (sdxl, refiner, sd15, None)] == [
        torch.float16, torch.float16, torch.float32, torch.float32]
    assert runtime.choose_dtype("fp32", sdxl) == torch.float32 and runtime.choose_dtype("bf16", sdxl) == torch.bfloat16
    assert runtime.choose_dtype("fp16", sd15) == torch.float16


def test_fp16_storage_computes_in_float32(sdxl):
    """Linear and Conv2d weights but GEGLU's projections stay fp16 (2 bytes a number), everything else is float32
    (4), and each network gives what the float32 network with the same fp16-rounded weights gives (float32
    arithmetic: to float32's rounding)."""
    stored = copy.deepcopy(sdxl).half()
    counts = [runtime.compute_in_float32(n) for n in (stored.text_encoder, stored.unet, stored.vae)]
    reference = copy.deepcopy(sdxl).half().float()
    projections = [m.proj for m in stored.unet.modules() if isinstance(m, GEGLU)]
    assert projections and all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in projections)
    layers = [m for m in stored.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
              and all(m is not p for p in projections)]
    assert sum(counts) == len(layers) and all(type(m) in (HalfStoredLinear, HalfStoredConv2d) for m in layers)
    assert all(m.weight.dtype == torch.float16 for m in layers)
    others = [p for n, p in stored.named_parameters() if not (n.endswith("weight") and p.dtype == torch.float16)]
    assert others and all(p.dtype == torch.float32 for p in others)
    assert stored.dtype == stored.text_encoder.dtype == stored.vae.dtype == torch.float32
    layer_weights = sum(m.weight.numel() for m in layers)
    assert sum(p.numel() * p.element_size() for p in stored.parameters()) == (
        2 * layer_weights + 4 * (sum(p.numel() for p in stored.parameters()) - layer_weights))
    g = torch.Generator().manual_seed(0)
    x, t, ids = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 20]), sdxl.tokenizer(["a red circle", ""])
    y = torch.randn(2, sdxl.config.unet.adm_in_channels, generator=g)
    with torch.no_grad():
        states, pooled = stored.text_encoder.encode(ids)
        want_states, want_pooled = reference.text_encoder.encode(ids)
        assert states.dtype == torch.float32
        torch.testing.assert_close(states, want_states, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pooled, want_pooled, rtol=1e-5, atol=1e-5)
        out = stored.unet(x, t, want_states, y=y)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, reference.unet(x, t, want_states, y=y), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stored.vae.decode(x), reference.vae.decode(x), rtol=1e-5, atol=1e-5)


def test_networks_in_other_dtypes_are_left_alone(sdxl):
    network = copy.deepcopy(sdxl.unet)
    assert runtime.compute_in_float32(network) == 0 and not runtime.half_stored(network)
    assert all(type(m) is not HalfStoredLinear for m in network.modules())


def test_avx2_path_end_to_end(sdxl, tmp_path, monkeypatch):
    """The CLI's and the server's loading on a CPU without native bf16 (forced): an SDXL file's config read first,
    its weights loaded in fp16 (no float32 copy) and prepared to compute in float32; the picture is the float32
    model's on the same fp16-rounded weights, to 8-bit rounding."""
    _cpu(monkeypatch, {"avx2", "fma"})
    path = plainsd.save(sdxl, tmp_path / "sdxl.safetensors")
    config = weights.read_config(path)
    assert config.sdxl == "base" and config == weights.load(path).config
    dtype = runtime.choose_dtype("auto", config)
    engine = runtime.prepare(plainsd.load(path, dtype=dtype))
    assert engine.load_dtype == torch.float16 and engine.sd.dtype == torch.float32
    assert runtime.half_stored(engine.sd.unet) and runtime.half_stored(engine.sd.text_encoder)
    kw = dict(steps=3, seed=5, width=64, height=64, sampler="Euler")
    got = pipeline.txt2img(engine, "a red circle", "blurry", **kw).images[0]
    want = pipeline.txt2img(copy.deepcopy(sdxl).half().float(), "a red circle", "blurry", **kw).images[0]
    assert np.abs(np.asarray(got, dtype=np.int16) - np.asarray(want, dtype=np.int16)).max() <= 1
