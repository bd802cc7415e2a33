"""Winograd's F(4x4, 3x3): the direct convolution's numbers (exactly in float64, to rounding in float32), which
layers of a prepared model use it, and its transformed filters following the layer's weight."""

import pytest
import torch
import torch.nn.functional as F

import plainsd
from plainsd import runtime
from plainsd.config import AdapterConfig
from plainsd.models.t2i_adapter import T2IAdapter
from plainsd.runtime import packing, winograd
from plainsd.runtime.winograd import transform_filters, uses_winograd, winograd_conv2d

needs_fp32_packing = pytest.mark.skipif(not runtime.packing_available(torch.float32), reason="torch's oneDNN ops for "
                                        "packed weights are missing here (prepare() then keeps plain weights)")


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


# sizes not a multiple of 4 (cropped tiles), batch 1 and 3, tall and thin, one pixel
@pytest.mark.parametrize("batch,channels,out_channels,height,width",
                         [(1, 3, 5, 4, 4), (2, 7, 3, 9, 13), (3, 16, 8, 33, 30), (2, 8, 8, 130, 6), (1, 4, 6, 1, 1)])
def test_the_algorithm_is_the_convolution_exactly_in_float64(batch, channels, out_channels, height, width):
    torch.manual_seed(0)
    x = torch.randn(batch, channels, height, width, dtype=torch.float64)
    weight = torch.randn(out_channels, channels, 3, 3, dtype=torch.float64)
    bias = torch.randn(out_channels, dtype=torch.float64)
    got = winograd_conv2d(x, transform_filters(weight), bias)
    assert got.shape == (batch, out_channels, height, width) and got.is_contiguous(memory_format=torch.channels_last)
    assert _relative(got, F.conv2d(x, weight, bias, padding=1)) < 1e-13
    assert _relative(winograd_conv2d(x, transform_filters(weight), None), F.conv2d(x, weight, padding=1)) < 1e-13


def test_float32_rounding_is_within_a_few_times_the_direct_convolutions():
    torch.manual_seed(0)
    x = torch.randn(2, 256, 36, 36).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(128, 256, 3, 3) / 48, torch.randn(128)
    exact = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    direct = _relative(F.conv2d(x, weight, bias, padding=1), exact)
    assert _relative(winograd_conv2d(x, transform_filters(weight), bias), exact) < max(10 * direct, 2e-5)


@torch.no_grad()
def test_which_convolutions_use_it():
    wide = torch.nn.Conv2d(128, 128, 3, padding=1)
    x = torch.zeros(1, 128, 32, 32)
    assert uses_winograd(wide, x)
    assert not uses_winograd(wide, x[..., :31, :])  # too small an input
    assert not uses_winograd(wide, x.to(torch.bfloat16))  # bf16 keeps oneDNN's direct convolution
    others = [torch.nn.Conv2d(64, 128, 3, padding=1), torch.nn.Conv2d(128, 64, 3, padding=1),
              torch.nn.Conv2d(128, 128, 3, stride=2, padding=1), torch.nn.Conv2d(128, 128, 1),
              torch.nn.Conv2d(128, 128, 3, padding=1, groups=2), torch.nn.Conv2d(128, 128, 3, padding=2, dilation=2),
              torch.nn.Conv2d(128, 128, 3, padding=1, padding_mode="circular")]
    for conv in others:
        assert not uses_winograd(conv, torch.zeros(1, conv.in_channels, 32, 32)), conv


@needs_fp32_packing
def test_the_widest_float32_layers_make_their_filters_at_each_call():
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(1920, 640, 3, padding=1)  # the widest that keeps them
    wide = torch.nn.Conv2d(1280, 1280, 3, padding=1).requires_grad_(False)
    assert winograd.keeps_filters(layer) and not winograd.keeps_filters(wide)
    runtime.pack_weights(wide)
    large, small = torch.randn(2, 1280, 32, 32), torch.randn(1, 1280, 32, 32)  # 2048 and 1024 positions
    with torch.no_grad():
        got_large, got_small = wide(large), wide(small)
    weight = wide.weight
    assert 0 < _relative(got_large, F.conv2d(large, weight, wide.bias, padding=1)) < 2e-5
    assert _relative(got_small, F.conv2d(small, weight, wide.bias, padding=1)) < 1e-6  # oneDNN's direct one
    assert wide.winograd is None  # nothing kept


@needs_fp32_packing
def test_a_packed_layer_runs_it_and_follows_its_weight():
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(128, 128, 3, padding=1)
    plain_weight = layer.weight.detach().clone()
    big, small = (torch.randn(2, 128, s, s).contiguous(memory_format=torch.channels_last) for s in (36, 12))
    with torch.no_grad():
        expected = [layer(big), layer(small)]
        runtime.pack_weights(layer)
        got = [layer(big), layer(small)]
    assert layer.winograd is not None and layer.winograd.shape == (36, 128, 128)
    assert 0 < _relative(got[0], expected[0]) < 2e-5  # Winograd's (not the direct convolution's) numbers
    assert _relative(got[1], expected[1]) < 1e-6  # the small input: oneDNN's direct convolution
    assert torch.equal(layer.state_dict()["weight"], plain_weight)
    new_weight = torch.randn_like(plain_weight) / 32
    packing.set_weight(layer, new_weight)  # (what LoRA does): the transformed filters are made again
    with torch.no_grad():
        assert _relative(layer(big), F.conv2d(big, new_weight, layer.bias, padding=1)) < 2e-5
    runtime.unpack_weights(layer)
    assert "winograd" not in layer.__dict__ and torch.equal(layer.weight, new_weight)
    big.requires_grad_(True)  # training: the plain convolution, with its gradients
    assert layer(big).requires_grad


@needs_fp32_packing
def test_a_network_run_once_a_picture_makes_its_filters_each_call():
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(128, 128, 3, padding=1).requires_grad_(False)
    runtime.pack_weights(layer, runs_once=True)
    runtime.unpack_weights(layer)
    runtime.pack_weights(layer)  # packed again (as offloading does): still marked
    large, small = torch.randn(1, 128, 48, 48), torch.randn(1, 128, 40, 40)  # 2304 and 1600 positions
    with torch.no_grad():
        got_large, got_small = layer(large), layer(small)
    assert 0 < _relative(got_large, F.conv2d(large, layer.weight, layer.bias, padding=1)) < 2e-5  # Winograd's
    assert _relative(got_small, F.conv2d(small, layer.weight, layer.bias, padding=1)) < 1e-6  # the direct one
    assert layer.winograd is None  # nothing kept


def test_prepare_marks_the_vae_alone():
    """The VAE runs once a picture, a T2I-Adapter once a pass: their layers make Winograd's filters at each call
    (a swapped-in VAE's too); the UNet's keep theirs."""
    engine = runtime.prepare(plainsd.build("tiny", seed=0))
    other = plainsd.build("tiny", seed=1).vae
    engine.use_vae(other)
    for vae in (engine.base_vae, other):
        convs = [m for m in vae.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs and not any(winograd.keeps_filters(m) for m in convs)
    assert all(winograd.keeps_filters(m) for m in engine.sd.unet.modules() if isinstance(m, torch.nn.Conv2d))
    adapter = runtime.prepare_controlnet(T2IAdapter(AdapterConfig(channels=(32, 64), num_res_blocks=1)), engine)
    assert not any(winograd.keeps_filters(m) for m in adapter.modules() if isinstance(m, torch.nn.Conv2d))


def test_the_transforms_are_the_published_matrices():
    """B^T d B, G g G^T and A^T m A for one tile, against the matrices written out (Lavin and Gray, 2015)."""
    torch.manual_seed(0)
    tile, filt, product = torch.randn(6, 6, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64), \
        torch.randn(6, 6, dtype=torch.float64)
    bt, g, at = (torch.tensor(m, dtype=torch.float64) for m in (winograd._BT, winograd._G, winograd._AT))
    assert torch.allclose((winograd.INPUT_TRANSFORM @ tile.reshape(36)).view(6, 6), bt @ tile @ bt.T)
    assert torch.allclose((winograd.FILTER_TRANSFORM @ filt.reshape(9)).view(6, 6), g @ filt @ g.T)
    assert torch.allclose((winograd.OUTPUT_TRANSFORM @ product.reshape(36)).view(4, 4), at @ product @ at.T)


def test_fp16_weights_run_it_on_large_inputs_with_filters_made_each_call():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Conv2d(128, 128, 3, padding=1)).half()
    assert runtime.compute_in_float32(layer) == 1
    conv = layer[0]
    weight = conv.weight.float()  # the fp16 weights, computed in float32
    large, small = torch.randn(1, 128, 64, 64), torch.randn(1, 128, 40, 40)  # 4096 and 1600 positions
    with torch.no_grad():
        got_large, got_small = conv(large), conv(small)
    assert 0 < _relative(got_large, F.conv2d(large, weight, conv.bias, padding=1)) < 2e-5
    assert torch.equal(got_small, F.conv2d(small, weight, conv.bias, padding=1))
    assert "winograd" not in conv.__dict__ and conv.weight.dtype == torch.float16  # nothing kept


def test_many_chunks_of_tile_rows_and_strided_inputs(monkeypatch):
    monkeypatch.setattr(winograd, "_TILES_PER_CHUNK", 1)  # one tile row a chunk
    torch.manual_seed(0)
    weight, bias = torch.randn(6, 4, 3, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    for x in (torch.randn(3, 4, 9, 5, dtype=torch.float64), torch.randn(1, 4, 13, 13, dtype=torch.float64),
              torch.randn(2, 8, 8, 8, dtype=torch.float64)[:, ::2]):  # every other channel: not contiguous
        got = winograd_conv2d(x, transform_filters(weight), bias)
        assert _relative(got, F.conv2d(x, weight, bias, padding=1)) < 1e-13


def test_training_and_tracing_keep_the_plain_convolution():
    wide = torch.nn.Conv2d(128, 128, 3, padding=1)
    x = torch.zeros(1, 128, 32, 32)
    assert not uses_winograd(wide, x)  # its weight requires grad
    wide.requires_grad_(False)
    assert uses_winograd(wide, x)
    assert not uses_winograd(wide, x.requires_grad_(True))
    with torch.no_grad():
        assert uses_winograd(wide, x)
    seen = []
    probe = lambda t: seen.append(uses_winograd(wide, t)) or t  # noqa: E731
    torch.jit.trace(probe, torch.zeros(1, 128, 32, 32), check_trace=False)
    assert seen == [False]
