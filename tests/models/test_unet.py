"""The UNet gives diffusers' UNet2DConditionModel outputs on the same weights (loaded from a diffusers folder)."""

import pytest
import torch

import plainsd
from tests.reference import max_diff

TOL = 1e-4


def _compare(reference, record_parity, name, size=16, width=None):
    config, unet, _, _, _, sd = reference(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.unet.in_channels, size, width or size, generator=g)
    t = torch.tensor([10, 900])
    ctx = torch.randn(2, 77, config.unet.context_dim, generator=g)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx).sample
        ours = sd.unet(x, t, ctx)
    d = max_diff(ours, ref)
    record_parity(f"UNet {name} vs diffusers (latent {x.shape[2]}x{x.shape[3]})", d)
    assert d <= TOL, d
    assert ref.abs().mean() > 0.01  # the comparison is not between two near-zero outputs


@pytest.mark.parametrize("name", ["tiny", "tiny-sd2", "tiny-inpaint", "tiny-deep"])
def test_tiny_unet_matches_diffusers(reference, record_parity, name):
    _compare(reference, record_parity, name)


def test_sizes_that_are_not_multiples_of_the_unet_factor(reference, record_parity):
    """Latents 9x13 (images 72x104): upsampling follows the skip connections' sizes, as diffusers does."""
    _compare(reference, record_parity, "tiny-deep", size=9, width=13)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_unet_matches_diffusers(reference, record_parity, name):
    _compare(reference, record_parity, name, size=16)


def test_fractional_and_scalar_timesteps(tiny):
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 128)
    a = tiny.unet(x, torch.tensor([500.0, 500.0]), ctx)
    assert torch.allclose(tiny.unet(x, 500, ctx), a)
    assert not torch.allclose(tiny.unet(x, 500.5, ctx), a)


def test_bad_shapes_are_clear(tiny):
    with pytest.raises(ValueError, match=r"takes \[B, 4, h, w\]"):
        tiny.unet(torch.randn(1, 3, 8, 8), 1, torch.randn(1, 77, 128))
    with pytest.raises(ValueError, match="width 128"):
        tiny.unet(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 77, 32))


def test_build_is_deterministic():
    a, b = plainsd.build("tiny", seed=3), plainsd.build("tiny", seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = plainsd.build("tiny", seed=4)
    assert not torch.equal(a.unet.out[2].weight, c.unet.out[2].weight)


def test_bf16_cpu_attention_takes_plain_matrix_products_within_bf16_tolerance(monkeypatch):
    import torch.nn.functional as F

    from plainsd.models import layers

    torch.manual_seed(0)
    real_sdpa = F.scaled_dot_product_attention
    calls = []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append("sdpa") or real_sdpa(*a, **kw))
    for path, keys in (("_attention_by_head", 1024), ("_attention_batched", 77)):  # self-attention at 1024 tokens, text
        real = getattr(layers, path)
        monkeypatch.setattr(layers, path, lambda *a, real=real, path=path, **kw: calls.append(path) or real(*a, **kw))
        q = torch.randn(2, 1024, 80)  # [B, N, C], 2 heads of 40 as SD1.5's first level
        k, v = torch.randn(2, keys, 80), torch.randn(2, keys, 80)
        ref = real_sdpa(*(t.reshape(2, -1, 2, 40).transpose(1, 2) for t in (q, k, v))).transpose(1, 2).reshape(2, 1024, 80)
        calls.clear()
        got = layers.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads=2)
        assert calls == [path] and got.dtype == torch.bfloat16
        sdpa = real_sdpa(*(t.bfloat16().reshape(2, -1, 2, 40).transpose(1, 2) for t in (q, k, v))).transpose(1, 2).reshape(2, 1024, 80)
        err, err_sdpa = ((got.float() - ref).norm() / ref.norm()).item(), ((sdpa.float() - ref).norm() / ref.norm()).item()
        assert err < 0.01 and err < 2 * err_sdpa, (path, err, err_sdpa)  # as close to float32 as bf16 SDPA is
    calls.clear()
    layers.attention(q, k, v, heads=2)  # float32 keeps SDPA
    qg = q.bfloat16().requires_grad_()
    layers.attention(qg, k.bfloat16(), v.bfloat16(), heads=2).float().sum().backward()  # training keeps SDPA
    assert calls == ["sdpa", "sdpa"] and qg.grad is not None
