"""Each image's starting noise as A1111 draws it: its seed, a variation seed blended in, a seed resized.

    noise = ImageNoise(subseed_strength=0.3).draw((4, 64, 64), seeds=[1, 1], subseeds=[7, 8])

Image i's noise comes from a torch generator seeded with its seed (on the CPU, so a seed gives the same picture
on any machine). A variation seed (A1111's subseed) draws a second noise of its own, and the two are blended by
spherical linear interpolation (slerp): strength 0 is the seed's noise, 1 the subseed's, and in between the
blend keeps the length a standard normal noise has. "Seed resize from" draws the noise at another size and
places it in the middle of the requested one, so a composition found at one size survives at a nearby one.

The generator that drew an image's noise goes on to give the noise a stochastic sampler adds at later steps,
unless an eta noise seed delta (A1111's ENSD) restarts it at seed + delta. A variation seed changes the starting
noise only: the later noise is the seed's. (A1111: modules/rng.py, ImageRNG.)

The numbers come from A1111's random number source (SOURCES): "GPU" and "CPU" are torch's CPU generator (plainsd
runs on the CPU, and A1111 without a GPU draws these for "GPU" too), "NV" the numbers an NVIDIA GPU draws
(philox.py), so that a seed gives the picture it gives there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .philox import PhiloxGenerator

SOURCES = ("GPU", "CPU", "NV")   # A1111's randn_source setting, its default first


def generator(seed: int, source: str = "GPU"):
    """A seed's generator for this random number source: a torch.Generator, or for "NV" a PhiloxGenerator."""
    if source not in SOURCES:
        raise ValueError(f"unknown random number source {source!r}; the sources are {', '.join(SOURCES)}")
    return PhiloxGenerator(seed) if source == "NV" else torch.Generator().manual_seed(int(seed))


def randn(gen, shape) -> torch.Tensor:
    """Standard normal float32 noise of this shape from a generator made by generator(), moving it on."""
    if isinstance(gen, PhiloxGenerator):
        return gen.randn(shape)
    return torch.randn(shape, generator=gen)


def slerp(t: float, low: torch.Tensor, high: torch.Tensor, dim: int) -> torch.Tensor:
    """Spherical linear interpolation from low (t = 0) to high (t = 1) of the vectors along `dim`, each pair
    on its own: the angle between them is divided in proportion t. Nearly parallel vectors (a mean cosine
    above 0.9995, as A1111 tests it) are interpolated linearly, where the angle's sine would divide by ~0."""
    low_unit = low / low.norm(dim=dim, keepdim=True)
    high_unit = high / high.norm(dim=dim, keepdim=True)
    cos = (low_unit * high_unit).sum(dim, keepdim=True)
    if cos.mean() > 0.9995:
        return low * (1 - t) + high * t
    omega = torch.acos(cos)
    sin = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / sin) * low + (torch.sin(t * omega) / sin) * high


def place_centred(small: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
    """`small` [C, h, w] put in the middle of a copy of `big` [C, H, W]: where small is smaller it is pasted
    whole, where larger its middle is cut out. A1111's arithmetic (rounding included): the offset is
    (H - h) // 2, and a larger side keeps h + 2 * offset rows, so an odd difference leaves big's last row."""
    out = big.clone()
    dx, dy = (big.shape[2] - small.shape[2]) // 2, (big.shape[1] - small.shape[1]) // 2
    w = small.shape[2] if dx >= 0 else small.shape[2] + 2 * dx
    h = small.shape[1] if dy >= 0 else small.shape[1] + 2 * dy
    tx, ty, sx, sy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
    out[:, ty:ty + h, tx:tx + w] = small[:, sy:sy + h, sx:sx + w]
    return out


@dataclass
class ImageNoise:
    """How a run draws its images' noise. subseed_strength: 0 = the seed's noise only, 1 = the subseed's.
    resize_from: (rows, columns) of latents to draw the noise at, then placed centred (None: the image's own
    size). ensd: A1111's eta noise seed delta, where a sampler's later noise starts (0: it continues the seed's).
    source: the random number source (SOURCES)."""
    subseed_strength: float = 0.0
    resize_from: tuple[int, int] | None = None
    ensd: int = 0
    source: str = "GPU"

    def draw(self, shape: tuple[int, int, int], seeds: list[int], subseeds: list[int] | None = None,
             ) -> tuple[torch.Tensor, list[torch.Generator]]:
        """The noise [B, *shape] of images with these seeds (and subseeds), and one generator per image that
        goes on to give the sampler's later noise."""
        drawn_shape = shape if self.resize_from is None else (shape[0], *self.resize_from)
        noises, generators = [], []
        for i, seed in enumerate(seeds):
            gen = generator(seed, self.source)
            own = randn(gen, shape)  # the image's generator moves on by one noise as always
            noise = own if drawn_shape == tuple(shape) else self._randn(seed, drawn_shape)
            if subseeds is not None and self.subseed_strength:
                # along the rows of [C, H, W]: A1111 normalises dim 1, so each channel's column is one vector
                noise = slerp(self.subseed_strength, noise, self._randn(subseeds[i], drawn_shape), dim=1)
            if drawn_shape != tuple(shape):
                noise = place_centred(noise, own)
            noises.append(noise)
            generators.append(generator(int(seed) + self.ensd, self.source) if self.ensd else gen)
        return torch.stack(noises), generators

    def _randn(self, seed: int, shape) -> torch.Tensor:
        return randn(generator(seed, self.source), shape)
