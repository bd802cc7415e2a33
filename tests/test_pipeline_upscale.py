"""The hires fix with an upscaler model (A1111's hr_upscaler by name), on the tiny random model."""

import numpy as np
import pytest

import plainsd
from plainsd import pipeline, upscale
from plainsd.pnginfo import parse_infotext
from tests.test_upscale import _esrgan_old, _write

pytest.importorskip("spandrel")


@pytest.fixture(scope="module")
def sd():
    return plainsd.build("tiny", seed=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    _write(_esrgan_old(seed=4, scale=2), root / "ESRGAN" / "2x-test.pth")
    return root


def _arr(image):
    return np.asarray(image, dtype=np.int16)


def test_hires_fix_with_an_upscaler_model(sd, folder):
    """As with Lanczos: the second pass is img2img of the first pass's picture, here upscaled by the model (1.5 x:
    the 2x model once, then Lanczos down to 96x96, as A1111's resize_image does)."""
    hires = pipeline.HiresFix(scale=1.5, upscaler="2x-test", steps=6, strength=0.5)
    r = pipeline.txt2img(sd, "a red circle", steps=4, seed=3, sampler="Euler", hires=hires, upscalers_dir=str(folder))
    first = pipeline.txt2img(sd, "a red circle", steps=4, seed=3, sampler="Euler")
    up = upscale.resize(first.images[0], 96, 96, "2x-test", folder, precision="fp32")
    again = pipeline.img2img(sd, up, "a red circle", steps=12, seed=3, sampler="Euler", strength=0.45)
    assert r.images[0].size == (96, 96)
    assert np.abs(_arr(r.images[0]) - _arr(again.images[0])).max() <= 1
    lanczos = pipeline.txt2img(sd, "a red circle", steps=4, seed=3, sampler="Euler",
                               hires=pipeline.HiresFix(scale=1.5, upscaler="Lanczos", steps=6, strength=0.5))
    assert np.abs(_arr(r.images[0]) - _arr(lanczos.images[0])).max() > 8  # the model's picture, not Lanczos'
    assert parse_infotext(r.infotexts[0])["Hires upscaler"] == "2x-test"


def test_unknown_hires_upscaler_lists_the_folder(sd, folder):
    with pytest.raises(ValueError, match=r"unknown hires upscaler 'UltraSharp'; plainsd has Latent, .*, Nearest, "
                                         r"2x-test"):
        pipeline.txt2img(sd, "x", steps=2, hires=pipeline.HiresFix(upscaler="UltraSharp"), upscalers_dir=str(folder))
    with pytest.raises(ValueError, match="tile overlap"):
        pipeline.txt2img(sd, "x", steps=2, upscaler_tile=32, upscaler_tile_overlap=40)
