"""Packed weights: the plain layers' numbers (bit for bit where oneDNN allows), back to plain on demand, a
convolution's layout following its input's shape, LoRA on packed layers."""

import pytest
import torch

import plainsd
from tests.reference import perturb
from plainsd import runtime
from plainsd.models.layers import GEGLU
from plainsd.pipeline import txt2img
from plainsd.runtime import packing


def _model(seed=0):
    return perturb(plainsd.build("tiny", seed=seed), seed)  # no zero-initialised layer hides a difference


needs_packing = pytest.mark.skipif(not runtime.packing_available(), reason="torch's oneDNN ops for packed bf16 weights "
                                   "are missing here or this CPU has no oneDNN bf16 kernels (prepare() then keeps "
                                   "plain bf16 weights)")
needs_fp32_packing = pytest.mark.skipif(not runtime.packing_available(torch.float32), reason="torch's oneDNN ops for "
                                        "packed weights are missing here (prepare() then keeps plain weights)")
PACKING_DTYPES = [pytest.param(torch.bfloat16, marks=needs_packing), pytest.param(torch.float32, marks=needs_fp32_packing)]


@pytest.mark.parametrize("dtype", PACKING_DTYPES)
def test_packed_layers_give_the_plain_layers_numbers(dtype):
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(32, 48, 3, padding=1), torch.nn.Conv2d(48, 32, 1), torch.nn.Conv2d(48, 32, 1, stride=2),
              torch.nn.Conv2d(32, 32, 3, stride=2, padding=1), torch.nn.Conv2d(32, 32, 3, padding=1, groups=4),
              torch.nn.Conv2d(32, 16, 3, padding=1, bias=False), torch.nn.Linear(64, 96), torch.nn.Linear(64, 96, bias=False)]
    eps = torch.finfo(dtype).eps
    for layer in layers:
        layer = layer.to(dtype)
        conv = isinstance(layer, torch.nn.Conv2d)
        plain_weight = layer.weight.detach().clone()
        if not conv and dtype == torch.float32:  # float32 linear layers stay plain (MKL's sgemm)
            assert runtime.pack_weights(layer) == 0 and type(layer) is torch.nn.Linear
            continue
        # a convolution's layout follows the input's shape: the second and third calls change it, the last one
        # changes it back
        shapes = [(2, 12, 12), (2, 5, 7), (1, 12, 12), (2, 12, 12)] if conv else [(2, 7)]
        inputs = [torch.randn(n, layer.in_channels, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
                  if conv else torch.randn(n, h, layer.in_features).to(dtype) for n, h, w in
                  (s if len(s) == 3 else (*s, 0) for s in shapes)]
        with torch.no_grad():
            expected = [layer(x) for x in inputs]
        assert runtime.pack_weights(layer) == 1 and isinstance(layer, packing._Packed)
        with torch.no_grad():
            got = [layer(x) for x in inputs]
        for g, e in zip(got, expected):
            assert g.shape == e.shape and (not conv or g.is_contiguous(memory_format=torch.channels_last))
            if dtype == torch.bfloat16 and not (conv and layer.kernel_size == (1, 1)):
                assert torch.equal(g, e), layer
            else:  # 1x1: a matrix product over the channels; float32: plain small convolutions may not be oneDNN's
                g, e = g.float(), e.float()
                assert ((g - e).abs() <= e.abs() * 2 * eps + 8 * eps * e.abs().max()).all(), layer
        if conv and layer.kernel_size != (1, 1):
            assert layer.packed_for == packing._layout_key(inputs[-1]) and layer.packed[0].is_mkldnn
        assert "weight" not in dict(layer.named_parameters())  # no second copy of the weight is kept
        assert torch.equal(layer.state_dict()["weight"], plain_weight) and list(layer.state_dict()) == (
            ["weight", "bias"] if layer.bias is not None else ["weight"])
        assert runtime.unpack_weights(layer) == 1 and type(layer) in (torch.nn.Conv2d, torch.nn.Linear)
        assert torch.equal(layer.weight, plain_weight) and isinstance(layer.weight, torch.nn.Parameter)


@needs_packing
def test_a_repacked_convolution_hands_the_freed_memory_back_once_per_shape(monkeypatch):
    """Repacking (a convolution's first call at a size) frees the weight it replaces: malloc is asked to hand
    that memory back then (it kept a 512x512 step's peak 0.35 GB lower), and only then: not on every call."""
    trims = []
    monkeypatch.setattr(packing, "release_freed_memory", lambda: trims.append(1))
    layer = torch.nn.Conv2d(32, 32, 3, padding=1).to(torch.bfloat16)
    runtime.pack_weights(layer)
    plain = layer.packed[0]
    x, y = (torch.randn(1, 32, n, n).bfloat16().contiguous(memory_format=torch.channels_last) for n in (12, 6))
    with torch.no_grad():
        layer(x)
        assert len(trims) == 1 and layer.packed[0].is_mkldnn and plain.is_contiguous(memory_format=torch.channels_last)
        layer(x)
        layer(x)
        assert len(trims) == 1
        layer(y)  # another size: another layout
        assert len(trims) == 2


@pytest.mark.parametrize("dtype", PACKING_DTYPES)
def test_a_bf16_convolution_keeps_its_layout_when_only_the_batch_size_changes(monkeypatch, dtype):
    """A guided sampler whose guidance stops part of the way runs batch 2, then batch 1: in bf16 that must not
    repack the whole UNet (a second a time at 512x512); float32 layouts depend on the batch, so they repack."""
    trims = []
    monkeypatch.setattr(packing, "release_freed_memory", lambda: trims.append(1))
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(32, 32, 3, padding=1).to(dtype)
    x = torch.randn(2, 32, 12, 12).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = layer(x)
        runtime.pack_weights(layer)
        for n in (2, 1, 2, 1):
            got = layer(x[:n])
            assert torch.equal(got, expected[:n]) if dtype == torch.bfloat16 else torch.allclose(got, expected[:n], atol=1e-5)
    assert len(trims) == (1 if dtype == torch.bfloat16 else 4)


@needs_fp32_packing
def test_packed_float32_unet_and_vae_give_the_plain_numbers():
    """float32 inference packs the convolutions and GEGLU's projection (the rest of GEGLU stays plain); the UNet
    and the VAE agree with the plain networks to float32's rounding (the 1x1 convolutions and the projection
    round differently), at two image sizes."""
    sd, plain = _model(), _model()
    runtime.prepare(sd)
    assert any(isinstance(m, runtime.PackedConv2d) for m in sd.unet.modules())
    packed_linears = [m for m in sd.unet.modules() if isinstance(m, runtime.PackedLinear)]
    geglus = [m for m in sd.unet.modules() if isinstance(m, GEGLU)]
    assert packed_linears and {id(m) for m in packed_linears} == {id(m.proj) for m in geglus}
    assert all(len(m.packed) == 1 for m in packed_linears)  # whole: GEGLU's forward takes its halves apart
    assert not any(isinstance(m, runtime.PackedGEGLU) for m in geglus)
    t, c = torch.tensor([700.0, 700.0]), torch.randn(2, 77, 128)
    err = lambda a, b: ((a - b).norm() / b.norm()).item()
    with torch.no_grad():
        for shape in ((2, 4, 16, 16), (2, 4, 8, 24), (2, 4, 16, 16)):
            x = torch.randn(shape)
            assert err(sd.unet(x, t, c), plain.unet(x, t, c)) < 1e-5
            assert err(sd.vae.decode(x), plain.vae.decode(x)) < 1e-5
    assert all(torch.equal(v, plain.unet.state_dict()[k]) for k, v in sd.unet.state_dict().items())


@needs_packing
def test_packed_unet_within_bf16_tolerance_and_back_to_plain_on_demand():
    sd = _model()
    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([700.0, 700.0]), torch.randn(2, 77, 128)
    with torch.no_grad():
        exact = sd.unet(x, t, c)
        plain = sd.to(torch.bfloat16).unet(x, t, c).float()
        state = {k: v.clone() for k, v in sd.unet.state_dict().items()}
        runtime.prepare(sd)  # eager bf16: packed
        packed_layers = [m for m in sd.unet.modules() if isinstance(m, packing._Packed)]
        assert len(packed_layers) > 50 and any(isinstance(m, runtime.PackedGEGLU) for m in sd.unet.modules())
        packed = sd.unet(x, t, c).float()
    err = lambda y: ((y - exact).norm() / exact.norm()).item()
    # the fused GEGLU rounds once less than the plain path, the 1x1 convolutions differently
    assert err(packed) < 0.02 and err(packed) < 1.2 * err(plain), (err(packed), err(plain))
    assert all(torch.equal(v, state[k]) for k, v in sd.unet.state_dict().items())  # what save() writes
    # a gradient through a packed layer takes the plain path (the packed ops have no autograd)
    xg = x.bfloat16().requires_grad_()
    sd.unet(xg, t, c).float().sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    # .float() unpacks: the float32 model is the bf16 one, exactly
    sd.float()
    assert not any(isinstance(m, (packing._Packed, runtime.PackedGEGLU)) for m in sd.unet.modules())
    assert all(torch.equal(v.float(), state[k].float()) for k, v in sd.unet.state_dict().items())
    runtime.prepare(sd)  # float32: the convolutions and GEGLU's projection packed, the other linear layers plain
    assert not any(isinstance(m, runtime.PackedGEGLU) for m in sd.unet.modules())
    assert all(isinstance(m.proj, runtime.PackedLinear) and len(m.proj.packed) == 1  # whole, not in halves
               for m in sd.unet.modules() if isinstance(m, GEGLU))
    assert sum(isinstance(m, runtime.PackedLinear) for m in sd.unet.modules()) == sum(
        isinstance(m, GEGLU) for m in sd.unet.modules())


@pytest.mark.parametrize("dtype", PACKING_DTYPES)
def test_a_lora_on_a_packed_model_equals_it_on_a_plain_one_and_leaves_it_as_it_was(dtype, tmp_path):
    from safetensors.torch import save_file
    from plainsd import lora
    from tests.test_lora import random_lora
    sd = _model(2).to(dtype)
    save_file(random_lora(sd, seed=4), tmp_path / "style.safetensors")
    lora.use(sd, lora.resolve([("style", 0.8)], tmp_path))
    with_lora = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    lora.use(sd, [])
    runtime.prepare(sd)
    before = {k: v.clone() for k, v in sd.unet.state_dict().items()}
    kw = dict(steps=3, seed=1, width=32, height=32, lora_dir=tmp_path)
    plain_run = txt2img(sd, "a circle", **kw).images[0]
    on_packed = txt2img(sd, "a circle <lora:style:0.8>", **kw).images[0]
    assert isinstance(sd.unet.input_blocks[1][1].proj_in, runtime.PackedConv2d)  # a LoRA layer
    assert all(torch.equal(v, with_lora[k]) for k, v in sd.unet.state_dict().items())  # the same weights
    assert on_packed.tobytes() != plain_run.tobytes()  # and the packed layers did run with them
    assert txt2img(sd, "a circle", **kw).images[0].tobytes() == plain_run.tobytes()
    assert all(torch.equal(v, before[k]) for k, v in sd.unet.state_dict().items())  # taken off exactly
