"""The plainsd command: files written, identical output for identical arguments, one clear line on bad input."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from plainsd.cli import main
from plainsd.pnginfo import parse_infotext, read_parameters


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_txt2img_writes_png_with_parameters(capsys):
    assert main(["txt2img", "a red circle", "--steps", "3", "--seed", "7", "-o", "a.png", "--quiet",
                 "--sampler", "Euler a", "--negative-prompt", "blurry", "--cfg-scale", "6"]) == 0
    fields = parse_infotext(read_parameters("a.png"))
    assert fields["Prompt"] == "a red circle" and fields["Seed"] == "7" and fields["Sampler"] == "Euler a"
    assert fields["CFG scale"] == "6" and fields["Negative prompt"] == "blurry"
    assert "a.png  (seed 7)" in capsys.readouterr().out


def test_same_arguments_same_image():
    args = ["txt2img", "x", "--steps", "4", "--seed", "3", "--quiet", "--sampler", "DPM++ SDE"]
    main(args + ["-o", "a.png"])
    main(args + ["-o", "b.png"])
    assert open("a.png", "rb").read() == open("b.png", "rb").read()


def test_batches_default_folder_and_save_steps(tmp_path):
    assert main(["txt2img", "x", "--steps", "2", "--seed", "1", "--batch-size", "2", "--batch-count", "2", "--quiet"]) == 0
    names = sorted(p.name for p in (tmp_path / "outputs" / "txt2img").iterdir())
    assert names == ["00001-1.png", "00002-2.png", "00003-3.png", "00004-4.png"]
    assert main(["txt2img", "x", "--steps", "3", "--seed", "1", "-o", "s.png", "--save-steps", "--quiet"]) == 0
    gif = Image.open("s-steps.gif")
    assert gif.n_frames >= 4 and Image.open("s-steps.png").size == (4 * 64, 64)


def test_img2img_inpaint_and_png_info(capsys):
    Image.new("RGB", (64, 64), "red").save("init.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 32))
    mask.save("mask.png")
    assert main(["img2img", "x", "--init-image", "init.png", "--steps", "4", "--strength", "0.5", "-o", "i.png", "--quiet"]) == 0
    assert parse_infotext(read_parameters("i.png"))["Denoising strength"] == "0.5"
    assert main(["inpaint", "x", "--init-image", "init.png", "--mask", "mask.png", "--steps", "2", "-o", "p.png",
                 "--mask-blur", "0", "--quiet"]) == 0
    out = np.asarray(Image.open("p.png"))
    assert (out[40:, 40:] == [255, 0, 0]).all()
    capsys.readouterr()
    assert main(["png-info", "i.png"]) == 0
    assert "Denoising strength: 0.5" in capsys.readouterr().out
    assert main(["png-info", "init.png"]) == 1


@pytest.mark.parametrize("args,message", [
    (["txt2img", "x", "--width", "100"], "multiples of 8"),
    (["txt2img", "x", "--sampler", "Eulr"], "unknown sampler 'Eulr'; known samplers: DPM++ 2M"),
    (["txt2img", "x", "--schedule", "weird"], "unknown schedule 'weird'"),
    (["txt2img", "x", "--model", "missing.safetensors"], "no such checkpoint"),
    (["txt2img", "x", "-o", "out.jpg"], "must be a .png file"),
    (["img2img", "x", "--init-image", "nothing.png"], "no such image file"),
    (["img2img", "x", "--init-image", "bad.png"], "cannot read image bad.png"),
    (["png-info", "bad.png"], "cannot read image"),
])
def test_bad_input_is_one_line(args, message, capsys):
    open("bad.png", "wb").write(b"not a png")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("plainsd: error: ") and message in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_console_script_and_debug_traceback():
    ok = subprocess.run([sys.executable, "-m", "plainsd.cli", "samplers"], capture_output=True, text=True)
    assert ok.returncode == 0 and "DPM++ 2M" in ok.stdout and "Karras" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "plainsd.cli", "txt2img", "x", "--sampler", "nope", "--debug"],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert bad.returncode != 0 and "Traceback" in bad.stderr
