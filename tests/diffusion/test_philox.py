"""A1111's NV random number source against Random123's known answers and the numbers CUDA's torch.randn printed."""

import numpy as np
import pytest
import torch

from plainsd.diffusion.noise import ImageNoise, generator, randn
from plainsd.diffusion.philox import PhiloxGenerator, philox4x32

# Random123's tests/kat_vectors, philox4x32 with 10 rounds: counter, key -> the four words
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox_gives_random123s_known_answers(counter, key, expected):
    out = philox4x32(np.array(counter, dtype=np.uint32)[:, None], np.array(key, dtype=np.uint32)[:, None])
    assert tuple(int(w) for w in out[:, 0]) == expected


def test_the_numbers_cuda_draws():
    """torch.manual_seed(s); torch.randn(shape, device="cuda") as printed on NVIDIA GPUs: seed 0's first 16
    numbers (a cuDNN test's randn_like, to 8 digits; cuRAND's float32 sine and logarithm differ from the float64
    ones A1111 and plainsd use by a few float32 steps), and to the 4 printed decimals seed 42 at [1, 64, 2048]
    (pytorch issue 158398: the start, the first row's end, the second row's start) and seed 14 at [1000, 100] with
    mean 5 and variance 5 (issue 97097)."""
    cuda = [-0.9246624, -0.42534423, -2.6438458, 0.14518386, -0.1208664, -0.57972574, -0.622851, -0.3283869,
            -1.0745419, -0.36314395, -1.6710504, 2.2655048, 0.3116848, -0.1841891, 1.2866427, 1.1819527]
    assert torch.allclose(PhiloxGenerator(0).randn((2, 2, 2, 2)).flatten(), torch.tensor(cuda), atol=4e-7, rtol=0)
    x = PhiloxGenerator(42).randn((1, 64, 2048))
    printed = torch.tensor([0.1940, 2.1614, -0.1721, 1.4540, -2.7733, -0.8932, -0.4574, 0.8063, 0.1580])
    assert torch.allclose(torch.cat([x[0, 0, :3], x[0, 0, -3:], x[0, 1, :3]]), printed, atol=5.1e-5, rtol=0)
    y = 5 + 5**0.5 * PhiloxGenerator(14).randn((1000, 100))
    assert torch.allclose(y[0, :3], torch.tensor([2.8731, 5.2727, 2.9889]), atol=5.1e-5, rtol=0)


def test_a1111s_numbers_and_the_offset():
    """A1111's docstring example (rng_philox.py: Generator(seed=0).randn((3, 4))), and each call drawing at the next
    offset, the seed's low word the key's first (seed 2^32 + 2: key (2, 1))."""
    a1111 = [[-0.92466259, -0.42534415, -2.6438457, 0.14518388], [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
             [-1.07454231, -0.36314407, -1.67105067, 2.26550497]]
    g = PhiloxGenerator(0)
    assert torch.allclose(g.randn((3, 4)), torch.tensor(a1111), atol=3e-7, rtol=0)
    second = philox4x32(np.array([[1] * 5, [0] * 5, range(5), [0] * 5], dtype=np.uint32), np.zeros((2, 5), np.uint32))
    assert g.offset == 1 and torch.equal(g.randn((5,)), _box_muller(second))
    words = philox4x32(np.array([[0], [0], [3], [0]], dtype=np.uint32), np.array([[2], [1]], dtype=np.uint32))
    assert torch.equal(PhiloxGenerator(2**32 + 2).randn((4,))[3:], _box_muller(words))
    with pytest.raises(ValueError, match="a Philox seed is a whole number from 0 to 2\\^64 - 1, got -1"):
        PhiloxGenerator(-1)


def _box_muller(words):
    """The transform written out: u in (0, 1] from the first word, the angle from the second, in float64."""
    step = float(np.float32(2.0**-32 * 6.2831855))
    u = words[0].astype(np.float64) * 2.0**-32 + 2.0**-33
    angle = words[1].astype(np.float64) * step + step / 2
    return torch.from_numpy((np.sqrt(-2 * np.log(u)) * np.sin(angle)).astype(np.float32))


def test_an_images_noise_and_its_samplers_noise_come_from_its_nv_generator():
    """As A1111's ImageRNG: the first draw of Generator(seed) starts the image, the same generator's next draws are
    the sampler's noise; ENSD restarts them at seed + delta; a variation seed's noise is its own first draw."""
    noise, gens = ImageNoise(source="NV").draw((4, 8, 8), seeds=[7, 8])
    assert torch.equal(noise[1], PhiloxGenerator(8).randn((4, 8, 8)))
    later = PhiloxGenerator(8)
    later.randn((4, 8, 8))
    assert torch.equal(randn(gens[1], (4, 8, 8)), later.randn((4, 8, 8)))
    _, gens = ImageNoise(ensd=5, source="NV").draw((4, 8, 8), seeds=[7])
    assert torch.equal(randn(gens[0], (4, 8, 8)), PhiloxGenerator(12).randn((4, 8, 8)))
    varied, _ = ImageNoise(subseed_strength=1.0, source="NV").draw((4, 8, 8), seeds=[7], subseeds=[9])
    assert torch.equal(varied[0], PhiloxGenerator(9).randn((4, 8, 8)))
    cpu, _ = ImageNoise(source="CPU").draw((4, 8, 8), seeds=[7])
    assert torch.equal(cpu[0], torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(7)))
    with pytest.raises(ValueError, match="unknown random number source 'XPU'; the sources are GPU, CPU, NV"):
        generator(1, "XPU")
