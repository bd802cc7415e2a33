"""plainsd upscale and plainsd sd-upscale: files written as the library makes them, one sentence on bad input."""

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

import plainsd
from plainsd import upscale
from plainsd.cli import main
from plainsd.pnginfo import parse_infotext, read_parameters
from tests.test_upscale import _esrgan_old, _picture, _write

pytest.importorskip("spandrel")


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(_esrgan_old(seed=4, scale=2), tmp_path / "models" / "ESRGAN" / "2x-test.pth")
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", "a red circle\nSteps: 20, Seed: 1")
    _picture(40, 28).save(tmp_path / "pic.png", pnginfo=meta)
    return tmp_path / "models"


def test_upscale_writes_the_extras_result(folder, capsys):
    assert main(["upscale", "pic.png", "--upscaler", "2x-test", "--scale", "2", "--upscalers-dir", str(folder),
                 "-o", "big", "--precision", "fp32", "--quiet"]) == 0
    out = Image.open("big/pic.png")
    expected = upscale.upscale(Image.open("pic.png"), "2x-test", 2, folder, precision="fp32")
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(expected))
    assert read_parameters("big/pic.png") == "a red circle\nSteps: 20, Seed: 1"
    assert out.info["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: 2x-test"
    assert "big/pic.png  (40x28 -> 80x56" in capsys.readouterr().out


@pytest.mark.parametrize("args, words", [
    (["--upscaler", "UltraSharp"], "no upscaler named 'UltraSharp'"),
    (["--upscaler", "Lanczos", "--width", "100"], "give both --width and --height"),
    (["--upscaler", "Lanczos", "--scale", "9"], "upscaling_resize (the scale) must be between 1 and 8"),
    (["--upscaler", "Lanczos", "-o", "."], "would overwrite a picture being upscaled"),
    (["--upscaler", "Lanczos", "--upscaler-tile", "8"], "tile size"),
])
def test_upscale_bad_input(folder, capsys, args, words):
    assert main(["upscale", "pic.png", "--upscalers-dir", str(folder), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("plainsd: error: ") and words in err and err.count("\n") == 1


def test_upscale_missing_picture(folder, capsys):
    assert main(["upscale", "nope.png", "--upscaler", "Lanczos"]) == 2
    assert "no such image file: nope.png" in capsys.readouterr().err


def test_sd_upscale(folder, capsys):
    plainsd.save(plainsd.build("tiny", seed=0), "tiny.safetensors")
    assert main(["sd-upscale", "pic.png", "a red circle", "--model", "tiny.safetensors", "--upscaler", "2x-test",
                 "--upscalers-dir", str(folder), "--scale", "2", "--overlap", "8", "--width", "32", "--height", "32",
                 "--steps", "2", "--seed", "3", "-o", "sd.png", "--quiet"]) == 0
    fields = parse_infotext(read_parameters("sd.png"))
    assert Image.open("sd.png").size == (80, 56)
    assert (fields["SD upscale upscaler"], fields["SD upscale overlap"], fields["Size"]) == ("2x-test", "8", "32x32")
    assert main(["sd-upscale", "pic.png", "x", "--model", "tiny.safetensors", "--overlap", "40", "--width", "32",
                 "--height", "32"]) == 2
    assert "Tile overlap (40 px) must be less than the tiles' 32x32" in capsys.readouterr().err
