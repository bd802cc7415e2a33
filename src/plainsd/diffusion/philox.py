"""A1111's "NV" random number source: on the CPU, the standard normal numbers torch.randn draws on an NVIDIA GPU.

    g = PhiloxGenerator(seed=0)
    noise = g.randn((4, 64, 64))   # the first draw; the next call draws the next ones, as the GPU's generator does

A CUDA generator is the counter-based Philox 4x32 generator with 10 rounds (Salmon et al. 2011, "Parallel random
numbers: as easy as 1, 2, 3"): a pure function of a 128-bit counter and a 64-bit key. torch's CUDA randn gives
element i of a call the counter (offset, 0, i, 0) and the key (the seed's low 32 bits, its high 32 bits), and
turns the first two 32-bit words of the result into one normal number by the Box-Muller transform, keeping the
sine; each call moves the offset on by one. A1111 reproduces this on the CPU (modules/rng_philox.py), so a seed
gives the picture it gives on an NVIDIA GPU; plainsd computes it the same way, the transform in float64 and
rounded to float32 as A1111's is. It holds for a tensor the GPU fills in one wave of threads (any latent picture);
larger ones are laid out in ways that depend on the GPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
KEY_STEPS = (0x9E3779B9, 0xBB67AE85)   # the Weyl sequence the key moves on by after each round
ROUNDS = 10
# 2^-32 and 2^-32 * 2 pi as float32 numbers (cuRAND's CURAND_2POW32_INV and CURAND_2POW32_INV_2PI)
_TWO_POW32_INV = float(np.float32(2.3283064e-10))
_TWO_POW32_INV_2PI = float(np.float32(2.3283064e-10 * 6.2831855))
_LOW = np.uint64(0xFFFFFFFF)


def philox4x32(counter: np.ndarray, key: np.ndarray, rounds: int = ROUNDS) -> np.ndarray:
    """Philox 4x32: counter [4, n] and key [2, n] of uint32 -> four uint32 words [4, n] per column. Each round
    multiplies words 0 and 2 by the two multipliers into 64-bit products and mixes their high halves with words
    1 and 3 and the key; the key moves on between rounds."""
    c = [word.astype(np.uint64) for word in counter]
    k = [word.astype(np.uint64) for word in key]
    for r in range(rounds):
        if r:
            k = [(k[0] + KEY_STEPS[0]) & _LOW, (k[1] + KEY_STEPS[1]) & _LOW]
        p0, p1 = c[0] * np.uint64(MULTIPLIERS[0]), c[2] * np.uint64(MULTIPLIERS[1])
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k[0], p1 & _LOW, (p0 >> np.uint64(32)) ^ c[3] ^ k[1], p0 & _LOW]
    return np.stack(c).astype(np.uint32)


def box_muller(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Two uniform uint32 words -> one standard normal float32: u in (0, 1] from x, an angle in (0, 2 pi) from y,
    sqrt(-2 ln u) sin(angle), computed in float64."""
    u = x.astype(np.float64) * _TWO_POW32_INV + _TWO_POW32_INV / 2
    angle = y.astype(np.float64) * _TWO_POW32_INV_2PI + _TWO_POW32_INV_2PI / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(angle)).astype(np.float32)


class PhiloxGenerator:
    """A seed's stream of NVIDIA GPU normal numbers: each randn call draws one tensor and moves the offset on."""

    def __init__(self, seed: int):
        if not 0 <= int(seed) < 2**64:
            raise ValueError(f"a Philox seed is a whole number from 0 to 2^64 - 1, got {seed}")
        self.seed, self.offset = int(seed), 0

    def randn(self, shape) -> torch.Tensor:
        n = math.prod(shape)
        if n >= 2**32:
            raise ValueError(f"the NV source draws at most 2^32 - 1 numbers at once, not {n}")
        counter = np.zeros((4, n), dtype=np.uint32)
        counter[0] = self.offset
        counter[2] = np.arange(n, dtype=np.uint32)
        key = np.empty((2, n), dtype=np.uint32)
        key[0], key[1] = self.seed & 0xFFFFFFFF, self.seed >> 32
        self.offset += 1
        words = philox4x32(counter, key)
        return torch.from_numpy(box_muller(words[0], words[1])).reshape(tuple(shape))
