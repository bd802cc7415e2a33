"""The UNet gives diffusers' UNet2DConditionModel outputs on the same weights (loaded from a diffusers folder)."""

import pytest
import torch

import plainsd
from tests.reference import max_diff, perturb

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
    """The whole diffusers folder is read: its VAE and text encoder come out in the preset's shapes too (their
    numbers are compared at full size in test_vae.py and test_clip.py). A folder's text encoder runs to its last
    layer, as diffusers runs it, so its clip skip is not the preset's."""
    _compare(reference, record_parity, name, size=16)
    config, _, vae, _, _, sd = reference(name)
    assert sd.config.vae == config.vae and sd.config.scale_factor == vae.config.scaling_factor
    got, want = sd.config.text, config.text
    assert (got.width, got.layers, got.heads, got.act, got.layout) == (want.width, want.layers, want.heads, want.act,
                                                                       want.layout)


def test_fractional_and_scalar_timesteps(tiny):
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 128)
    a = tiny.unet(x, torch.tensor([500.0, 500.0]), ctx)
    assert torch.allclose(tiny.unet(x, 500, ctx), a)
    assert not torch.allclose(tiny.unet(x, 500.5, ctx), a)


def test_the_steps_compose_to_forward_split_at_any_block():
    """forward is embed_timesteps, the input blocks, the middle block, the output blocks and out; the output
    blocks run in two parts from any block give the same bits (the cache point fast.DeepCacheUNet uses)."""
    unet = perturb(plainsd.build("tiny", seed=0), 0).unet
    x, t, ctx = torch.randn(2, 4, 9, 13), torch.tensor([10.0, 900.0]), torch.randn(2, 77, 128)  # 9x13: upsample to size
    with torch.no_grad():
        reference = unet(x, t, ctx)
        emb = unet.embed_timesteps(t, 2)
        skips = unet.run_input_blocks(x, emb, ctx)
        assert len(skips) == len(unet.input_blocks) == len(unet.output_blocks)
        assert all(torch.equal(a, b) for a, b in zip(unet.run_input_blocks(x, emb, ctx, stop=2), skips[:2]))
        middle = unet.middle_block(skips[-1], emb, ctx)
        assert torch.equal(unet.out(unet.run_output_blocks(middle, list(skips), emb, ctx)), reference)
        for cut in range(len(unet.output_blocks) + 1):
            rest = list(skips)  # (the output blocks take their skips off the list)
            h = unet.run_output_blocks(middle, rest, emb, ctx, stop=cut)
            assert len(rest) == len(skips) - cut  # what is left: the outputs of the first n - cut input blocks
            h = unet.run_output_blocks(h, rest, emb, ctx, start=cut)
            assert torch.equal(unet.out(h), reference) and not rest, cut


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


# --- LCM-distilled UNets: the guidance-scale embedding ------------------------------------------------------

def _compare_lcm(reference, record_parity, name):
    """diffusers' UNet gets the guidance embedding as timestep_cond, made by its LCM pipeline's
    get_guidance_scale_embedding; plainsd's UNet gets the scale itself."""
    from diffusers import LatentConsistencyModelPipeline

    config, unet, _, _, _, sd = reference(name)
    assert sd.config.unet.time_cond_proj_dim == 256 and sd.unet.time_embedding.cond_proj.weight.shape == (
        config.unet.model_channels, 256)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, config.unet.context_dim, generator=g)
    t, w = torch.tensor([10, 900]), torch.tensor([7.0, 0.5])
    w_embedding = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx, timestep_cond=w_embedding).sample
        ours = sd.unet(x, t, ctx, guidance=w)
        other = sd.unet(x, t, ctx, guidance=torch.tensor([1.0, 3.0]))
    d = max_diff(ours, ref)
    record_parity(f"UNet {name} (guidance embedding) vs diffusers", d)
    assert d <= TOL, d
    assert (other - ours).abs().max() > 100 * TOL  # the guidance scale reaches the output


def test_tiny_lcm_unet_matches_diffusers(reference, record_parity):
    _compare_lcm(reference, record_parity, "tiny-lcm")


@pytest.mark.slow
def test_full_lcm_unet_matches_diffusers(reference, record_parity):
    _compare_lcm(reference, record_parity, "sd15-lcm")


def test_guidance_embedding_is_diffusers():
    """Bit for bit diffusers' get_guidance_scale_embedding (sines first, frequencies over half - 1 steps), which is
    not the timestep embedding of w * 1000; odd widths end with a zero."""
    from diffusers import LatentConsistencyModelPipeline

    from plainsd.models.layers import guidance_scale_embedding, timestep_embedding

    w = torch.tensor([0.0, 1.5, 7.0])
    for dim in (256, 17):
        ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        assert torch.equal(guidance_scale_embedding(w, dim), ref)
    assert not torch.allclose(guidance_scale_embedding(w, 256), timestep_embedding(w * 1000, 256), atol=1e-2)


def test_guidance_is_refused_by_a_unet_without_the_embedding(tiny):
    """Other UNets keep their keys and refuse a guidance scale rather than ignore it."""
    assert not any(k.startswith("time_embedding.") for k in tiny.unet.state_dict())
    with pytest.raises(ValueError, match="no guidance-scale embedding"):
        tiny.unet(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 77, 128), guidance=7.0)


def test_lcm_unet_steps_compose_with_the_guidance():
    """embed_timesteps takes the guidance as forward does (fast.DeepCacheUNet runs the UNet in parts); one scale
    for all rows is the same as one per row; without guidance nothing is added (diffusers without timestep_cond)."""
    cfg = plainsd.config.preset("tiny")
    cfg.unet.time_cond_proj_dim = 16
    unet = perturb(plainsd.build(cfg, seed=0), 0).unet
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0]), torch.randn(2, 77, 128)
    with torch.no_grad():
        reference = unet(x, t, ctx, guidance=3.0)
        assert torch.equal(unet(x, t, ctx, guidance=torch.tensor([3.0, 3.0])), reference)
        emb = unet.embed_timesteps(t, 2, 3.0)
        skips = unet.run_input_blocks(x, emb, ctx)
        h = unet.middle_block(skips[-1], emb, ctx)
        assert torch.equal(unet.out(unet.run_output_blocks(h, skips, emb, ctx)), reference)
        plain = unet.time_embed(plainsd.models.layers.timestep_embedding(t, 32))
        assert torch.equal(unet.embed_timesteps(t, 2), plain) and not torch.equal(emb, plain)
