"""The VAE gives diffusers' AutoencoderKL outputs on the same weights."""

import pytest
import torch

from tests.reference import max_diff

TOL = 1e-4


def _compare(reference, record_parity, name):
    config, _, vae, _, _, sd = reference(name)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    latents = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        ref_post = vae.encode(images).latent_dist
        ref_img = vae.decode(latents).sample
        post = sd.vae.encode(images)
        img = sd.vae.decode(latents)
    d = max(max_diff(post.mean, ref_post.mean), max_diff(post.logvar, ref_post.logvar))
    record_parity(f"VAE encoder {name} vs diffusers (mean, logvar)", d)
    assert d <= TOL
    d = max_diff(img, ref_img)
    record_parity(f"VAE decoder {name} vs diffusers", d)
    assert d <= TOL
    assert sd.config.scale_factor == vae.config.scaling_factor


def test_tiny_vae_matches_diffusers(reference, record_parity):
    _compare(reference, record_parity, "tiny")


@pytest.mark.slow
def test_full_vae_matches_diffusers(reference, record_parity):
    _compare(reference, record_parity, "sd15")


def test_latent_shape_and_sampling(tiny):
    post = tiny.vae.encode(torch.zeros(2, 3, 64, 32))
    assert post.mean.shape == (2, 4, 8, 4)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(post.sample(g1), post.sample(g2))
    kl = post.kl()
    expected = 0.5 * (post.mean**2 + post.var - 1 - post.logvar).sum(dim=[1, 2, 3])
    assert torch.allclose(kl, expected)


def test_bad_sizes(tiny):
    with pytest.raises(ValueError, match="multiples of 8"):
        tiny.vae.encode(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"decodes \[B, 4, h, w\]"):
        tiny.vae.decode(torch.zeros(1, 3, 8, 8))
