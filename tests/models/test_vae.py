"""The VAE gives diffusers' AutoencoderKL outputs on the same weights."""

import pytest
import torch

from tests.reference import diffusers_vae_kwargs, max_diff, random_module
from tests.test_configs import test_config

TOL = 1e-4


def _compare(vae, ours, record_parity, name):
    """vae: diffusers' AutoencoderKL; ours: plainsd's, loaded from its weights."""
    g = torch.Generator().manual_seed(1)
    images = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    latents = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        ref_post = vae.encode(images).latent_dist
        ref_img = vae.decode(latents).sample
        post = ours.encode(images)
        img = ours.decode(latents)
    d = max(max_diff(post.mean, ref_post.mean), max_diff(post.logvar, ref_post.logvar))
    record_parity(f"VAE encoder {name} vs diffusers (mean, logvar)", d)
    assert d <= TOL
    d = max_diff(img, ref_img)
    record_parity(f"VAE decoder {name} vs diffusers", d)
    assert d <= TOL


def test_tiny_vae_matches_diffusers(reference, record_parity):
    """Loaded with the rest of a diffusers folder, by plainsd.load."""
    _, _, vae, _, _, sd = reference("tiny")
    _compare(vae, sd.vae, record_parity, "tiny")
    assert sd.config.scale_factor == vae.config.scaling_factor


@pytest.mark.slow
def test_full_vae_matches_diffusers(tmp_path, record_parity):
    """The SD-size VAE alone, as a diffusers AutoencoderKL folder read by load_vae (the folder loader reads the
    whole SD1.5 and SD2.1 folders in tests/models/test_unet.py)."""
    from diffusers import AutoencoderKL

    from plainsd.weights import load_vae

    config = test_config("sd15")
    vae = random_module(lambda: AutoencoderKL(**diffusers_vae_kwargs(config.vae, config.scale_factor)), 7)
    vae.save_pretrained(tmp_path / "vae")
    ours = load_vae(tmp_path / "vae")
    assert ours.config == config.vae
    _compare(vae, ours, record_parity, "sd15")


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


def test_tiled_decode_has_no_seams_and_bounded_tiles():
    import plainsd
    from plainsd.models.vae import _starts

    sd = plainsd.build("tiny", seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sd.vae.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    vae = sd.vae
    small = torch.randn(1, 4, 12, 16, generator=g)
    with torch.no_grad():
        assert torch.equal(vae.decode_tiled(small, tile=16), vae.decode(small))  # fits one tile: plain decode
    lat = torch.nn.functional.interpolate(torch.randn(1, 4, 6, 8, generator=g), size=(40, 56), mode="bilinear")
    shapes = []
    original = vae.decode
    vae.decode = lambda z: (shapes.append(tuple(z.shape[2:])), original(z))[1]

    def seam_ratio(overlap):
        with torch.no_grad():
            img = vae.decode_tiled(lat, tile=16, overlap=overlap)
        assert img.shape == (1, 3, 320, 448)
        jumps = (img[..., 1:] - img[..., :-1]).abs().mean(dim=(0, 1, 2))  # per pair of neighbouring columns
        seams = [s * 8 - 1 for s in _starts(56, 16, 16 - overlap)[1:]]
        return float(jumps[seams].mean() / jumps.median())

    assert seam_ratio(0) > 2.0     # butted tiles: the measure sees the seams
    assert seam_ratio(6) < 1.3     # blended overlaps: tile borders look like any other column
    assert max(h * w for h, w in shapes) <= 16 * 16


def test_inference_path_gives_the_training_paths_numbers(tiny):
    """ResnetBlock's in-place inference path (less memory) computes exactly what the autograd path does."""
    vae = tiny.vae
    g = torch.Generator().manual_seed(3)
    images, z = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1, torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        encoded, decoded = vae.encode(images).mean, vae.decode(z)
    trained = [images.clone().requires_grad_(), z.clone().requires_grad_()]
    encoded_grad, decoded_grad = vae.encode(trained[0]).mean, vae.decode(trained[1])
    assert decoded_grad.requires_grad  # the autograd path ran
    assert torch.equal(encoded, encoded_grad.detach()) and torch.equal(decoded, decoded_grad.detach())
    (encoded_grad.sum() + decoded_grad.sum()).backward()
    assert trained[0].grad is not None and trained[1].grad is not None
