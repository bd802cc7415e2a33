"""Each image's starting noise: A1111's slerp of a seed's and a variation seed's noise, seed resize's placement."""

import math

import pytest
import torch

from plainsd.diffusion.noise import ImageNoise, place_centred, slerp


def _randn(seed, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _slerp_by_hand(t, a, b):
    """The textbook slerp of two vectors, in float64: the angle between them divided in proportion t."""
    a, b = a.double(), b.double()
    omega = math.acos(float(a @ b / (a.norm() * b.norm())))
    return (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)


def test_slerp_ends_and_middle():
    low, high = _randn(1, (4, 16, 12)), _randn(2, (4, 16, 12))
    assert torch.equal(slerp(0.0, low, high, dim=1), low)
    assert torch.equal(slerp(1.0, low, high, dim=1), high)
    mid = slerp(0.3, low, high, dim=1)
    for c, col in [(0, 0), (1, 5), (3, 11)]:  # A1111's vectors: each channel's column (dim 1 of [C, H, W])
        expected = _slerp_by_hand(0.3, low[c, :, col], high[c, :, col])
        assert torch.allclose(mid[c, :, col].double(), expected, atol=1e-5)
    # nearly parallel vectors (a seed blended with itself) are interpolated linearly: the same noise again
    assert torch.allclose(slerp(0.5, low, low, dim=1), low)


def test_place_centred_as_a1111():
    big = torch.zeros(1, 8, 8)
    small = torch.arange(1.0, 25.0).reshape(1, 4, 6)
    out = place_centred(small, big)  # offsets (8 - 4) // 2 = 2 rows, (8 - 6) // 2 = 1 column
    assert torch.equal(out[:, 2:6, 1:7], small) and out.sum() == small.sum()
    large = torch.arange(1.0, 122.0).reshape(1, 11, 11)
    out = place_centred(large, big)  # offset (8 - 11) // 2 = -2: rows 2..8 of it, 7 rows; the last stays big's
    assert torch.equal(out[:, :7, :7], large[:, 2:9, 2:9])
    assert out[:, 7, :].abs().sum() == 0 and out[:, :, 7].abs().sum() == 0


def test_image_noise_seeds_subseeds_and_generators():
    shape = (4, 8, 6)
    plain, gens = ImageNoise().draw(shape, [3, 4])
    assert torch.equal(plain[0], _randn(3, shape)) and torch.equal(plain[1], _randn(4, shape))
    # the generator goes on where the image's noise ended: the sampler's later noise
    g = torch.Generator().manual_seed(3)
    torch.randn(shape, generator=g)
    assert torch.equal(torch.randn(shape, generator=gens[0]), torch.randn(shape, generator=g))
    # a variation seed at strength 0 changes nothing; at 1 the noise is the subseed's; the later noise stays the seed's
    assert torch.equal(ImageNoise(0.0).draw(shape, [3], [9])[0], plain[:1])
    full, gens_full = ImageNoise(1.0).draw(shape, [3], [9])
    assert torch.equal(full[0], _randn(9, shape))
    g = torch.Generator().manual_seed(3)
    torch.randn(shape, generator=g)
    assert torch.equal(torch.randn(shape, generator=gens_full[0]), torch.randn(shape, generator=g))
    # ENSD: the later noise starts afresh at seed + delta
    _, gens_ensd = ImageNoise(ensd=31337).draw(shape, [3])
    assert torch.equal(torch.randn(shape, generator=gens_ensd[0]), _randn(3 + 31337, shape))


def test_seed_resize():
    shape = (4, 8, 10)
    same, _ = ImageNoise(resize_from=(8, 10)).draw(shape, [5])
    assert torch.equal(same, ImageNoise().draw(shape, [5])[0])  # from the same size: nothing changes
    small, _ = ImageNoise(resize_from=(4, 6)).draw(shape, [5])
    assert torch.equal(small[0, :, 2:6, 2:8], _randn(5, (4, 4, 6)))  # the small noise in the middle ...
    outside = torch.ones(shape, dtype=torch.bool)
    outside[:, 2:6, 2:8] = False
    assert torch.equal(small[0][outside], _randn(5, shape)[outside])  # ... the full-size noise around it
    blended, _ = ImageNoise(0.4, resize_from=(4, 6)).draw(shape, [5], [6])  # slerp at the drawn size, then placed
    assert torch.allclose(blended[0, :, 2:6, 2:8], slerp(0.4, _randn(5, (4, 4, 6)), _randn(6, (4, 4, 6)), dim=1))


@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
def test_blend_keeps_the_noise_standard(strength):
    noise, _ = ImageNoise(strength).draw((4, 64, 64), [1], [2])
    assert abs(float(noise.std()) - 1.0) < 0.02
