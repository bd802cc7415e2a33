"""A1111's SD upscale script on the shipped model: its arguments, strength 0, and blended seams (measured)."""

import numpy as np
import pytest
import torch

import plainsd
from plainsd import images as imgs
from plainsd import pipeline, scripts, upscale
from plainsd.pnginfo import parse_infotext
from plainsd.request import GenerationRequest
from tests.test_upscale import _esrgan_old, _write


@pytest.fixture(scope="module")
def sd():
    return plainsd.load()  # the shipped model draws 64x64 scenes; its tiles here are 64x64


@pytest.fixture(scope="module")
def picture(sd):
    return pipeline.txt2img(sd, "a red circle on the left", seed=1, steps=10).images[0]


@pytest.fixture(scope="module")
def redrawn(sd, picture):
    return _sd_upscale(sd, picture, 0.3, 16).images[0]


def _sd_upscale(sd, picture, strength, overlap, upscaler="Lanczos", **kw):
    request = GenerationRequest("a red circle on the left", init_image=picture, strength=strength, steps=10, seed=5,
                                width=64, height=64, **kw)
    return scripts.prepare("sd upscale", "img2img", request, [None, overlap, upscaler, 2.0])(sd)


def _psnr(a, b) -> float:
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(10 * np.log10(255**2 / (d**2).mean()))


def test_strength_0_is_the_plain_upscale(sd, picture, redrawn, record_parity):
    """At strength 0 nothing is redrawn: the result is the plain upscale as closely as img2img keeps a picture at
    strength 0 (encoded, A1111's one last step at the smallest noise, decoded). The shipped VAE knows whole 64x64
    scenes and round-trips these zoomed-in tiles at 25.1 dB; with the last step 20.8 dB (measured); strength 0.3
    redraws them (12.5 dB)."""
    plain = upscale.upscale(picture, "Lanczos", 2.0)
    kept = _sd_upscale(sd, picture, 0.0, 16)

    def through_vae(tile):
        with torch.no_grad():
            latents = sd.vae.encode(imgs.to_tensor(upscale._to_pil(tile))).mode() * sd.config.scale_factor
        return upscale._to_tensor(pipeline.decode(sd, latents)[0])

    vae_only = upscale._to_pil(upscale.tiled(through_vae, upscale._to_tensor(plain), 64, 64, 16))
    assert kept.images[0].size == plain.size == (128, 128)
    record_parity("SD upscale strength 0 vs the plain upscale (PSNR dB)", _psnr(kept.images[0], plain))
    record_parity("the VAE's round trip of its tiles vs the plain upscale (PSNR dB)", _psnr(vae_only, plain))
    assert _psnr(vae_only, plain) - 6 < _psnr(kept.images[0], plain) <= _psnr(vae_only, plain)
    assert _psnr(kept.images[0], plain) > _psnr(redrawn, plain) + 5
    fields = parse_infotext(kept.infotexts[0])
    assert (fields["SD upscale overlap"], fields["SD upscale upscaler"], fields["Size"]) == ("16", "Lanczos", "64x64")


def _border_vs_inside(image, starts) -> float:
    """The mean jump between neighbouring columns (rows) where a later tile starts, over the mean jump anywhere."""
    a = np.asarray(image, dtype=np.float64)
    jx, jy = np.abs(np.diff(a, axis=1)).mean(axis=(0, 2)), np.abs(np.diff(a, axis=0)).mean(axis=(1, 2))
    border = np.mean([jx[x - 1] for x in starts] + [jy[y - 1] for y in starts])
    return border / np.mean(np.concatenate([jx, jy]))


def test_seams_blend(sd, picture, redrawn):
    """Tiles redrawn at strength 0.3 differ where they overlap. Blended over 16 px, the jump across a tile's border
    is no larger than the picture's usual jump between neighbouring pixels (measured 0.56); pasted without
    overlap, the border is a visible step (measured 13.6 times the usual jump)."""
    blended = redrawn
    hard = _sd_upscale(sd, picture, 0.3, 0).images[0]
    assert upscale.positions(128, 64, 16) == [0, 32, 64] and upscale.positions(128, 64, 0) == [0, 64]
    assert _border_vs_inside(blended, [32, 64]) < 1.5
    assert _border_vs_inside(hard, [64]) > 5


def test_seeds_and_upscaler_model(tiny, picture, tmp_path):
    """A model upscaler by name (any case) or by its index in the list; tile k gets seed + k (batch size 1)."""
    _write(_esrgan_old(scale=2), tmp_path / "ESRGAN" / "2x-test.pth")
    request = GenerationRequest("a red circle", init_image=picture, strength=0.5, steps=2, seed=7, width=64,
                                height=64, upscalers_dir=str(tmp_path), upscaler_tile=0)
    names = upscale.upscaler_names(tmp_path)
    by_index = scripts.prepare("sd upscale", "img2img", request, ["", 16, names.index("2x-test"), 2])
    by_name = scripts.prepare("sd upscale", "img2img", request, ["", 16, "2X-TEST", 2])
    assert by_index.plan.upscaler == by_name.plan.upscaler == "2x-test"
    seeds = []
    real = scripts.generate
    try:
        scripts.generate = lambda engine, req, **kw: seeds.append(req.seed) or real(engine, req, **kw)
        result = by_name(tiny)
    finally:
        scripts.generate = real
    assert seeds == list(range(7, 16)) and result.seeds == [7]
    assert "SD upscale upscaler: 2x-test" in result.infotexts[0]


def test_bad_arguments(picture):
    request = GenerationRequest("x", init_image=picture, width=64, height=64)
    for args, words in [([None, 64, "Lanczos", 2], r"Tile overlap \(64 px\) must be less than the tiles' 64x64"),
                        ([None, 8, "UltraSharp", 2], "no upscaler named 'UltraSharp'"),
                        ([None, 8, "Lanczos", 9], r"Scale Factor \(script_args\[3\]\) must be a number from 1 to 8"),
                        ([None, -1, "Lanczos", 2], "Tile overlap"), ([1, 2, 3, 4, 5], "up to 4 script_args")]:
        with pytest.raises(ValueError, match=words):
            scripts.prepare("sd upscale", "img2img", request, args)
    with pytest.raises(ValueError, match="needs an init image"):
        scripts.prepare("sd upscale", "img2img", GenerationRequest("x"), [None, 8, "Lanczos", 2])
    with pytest.raises(ValueError, match="unknown script 'sd upscale' for txt2img"):
        scripts.prepare("sd upscale", "txt2img", request, [])
