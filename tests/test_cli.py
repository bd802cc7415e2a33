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


def test_token_merging_option():
    assert main(["txt2img", "x", "--steps", "2", "--seed", "1", "--token-merging", "0.5", "-o", "t.png", "--quiet"]) == 0
    assert parse_infotext(read_parameters("t.png"))["Token merging ratio"] == "0.5"


def test_variation_seed_seed_resize_tiling_and_sampler_noise_options(capsys):
    assert main(["txt2img", "x", "--steps", "2", "--seed", "4", "--subseed", "9", "--subseed-strength", "0.3",
                 "--seed-resize-from-w", "32", "--seed-resize-from-h", "48", "--tiling", "--sampler", "Euler",
                 "--s-churn", "1", "--s-noise", "1.01", "-o", "v.png", "--quiet"]) == 0
    fields = parse_infotext(read_parameters("v.png"))
    assert (fields["Seed"], fields["Variation seed"], fields["Variation seed strength"]) == ("4", "9", "0.3")
    assert (fields["Seed resize from"], fields["Tiling"]) == ("32x48", "True")
    assert (fields["Sigma churn"], fields["Sigma noise"]) == ("1", "1.01")
    assert main(["txt2img", "x", "--steps", "2", "--seed", "4", "--sampler", "Euler a", "--ensd", "31337",
                 "-o", "e.png", "--quiet"]) == 0
    assert parse_infotext(read_parameters("e.png"))["ENSD"] == "31337"
    assert main(["txt2img", "x", "--steps", "2", "--seed", "4", "--rng", "NV", "-o", "nv.png", "--quiet"]) == 0
    assert parse_infotext(read_parameters("nv.png"))["RNG"] == "NV"
    assert main(["txt2img", "x", "--rng", "cuda"]) == 2


def test_hires_fix_options():
    assert main(["txt2img", "x", "--steps", "2", "--seed", "1", "--hires", "-o", "h.png", "--quiet"]) == 0
    fields = parse_infotext(read_parameters("h.png"))
    assert Image.open("h.png").size == (128, 128) and fields["Size"] == "64x64"
    assert (fields["Hires upscale"], fields["Hires upscaler"], fields["Denoising strength"]) == ("2", "Latent", "0.7")
    assert main(["txt2img", "x", "--steps", "2", "--seed", "1", "--hires-width", "96", "--hires-upscaler", "Lanczos",
                 "--hires-strength", "0.4", "-o", "w.png", "--quiet"]) == 0  # any --hires-* option turns it on
    fields = parse_infotext(read_parameters("w.png"))
    assert Image.open("w.png").size == (96, 96) and fields["Hires resize"] == "96x0"
    assert (fields["Hires upscaler"], fields["Denoising strength"]) == ("Lanczos", "0.4")


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


def test_inpainting_options_and_outpaint():
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    init.save("init.png")
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (40, 8, 56, 24))
    mask.save("mask.png")
    assert main(["inpaint", "x", "--init-image", "init.png", "--mask", "mask.png", "--steps", "2", "-o", "p.png",
                 "--inpainting-fill", "latent noise", "--only-masked", "--only-masked-padding", "4", "--width", "32",
                 "--height", "32", "--mask-blur", "1", "--noise-multiplier", "0.9", "--quiet"]) == 0
    fields = parse_infotext(read_parameters("p.png"))
    assert (fields["Masked content"], fields["Inpaint area"], fields["Masked area padding"]) == (
        "latent noise", "Only masked", "4")
    assert fields["Noise multiplier"] == "0.9" and Image.open("p.png").size == (64, 48)
    assert np.array_equal(np.asarray(Image.open("p.png"))[40:, :16], np.asarray(init)[40:, :16])
    assert main(["outpaint", "init.png", "x", "--right", "32", "--steps", "2", "-o", "o.png", "--quiet"]) == 0
    out = np.asarray(Image.open("o.png").convert("RGB"))
    assert out.shape == (64, 128, 3)  # 96 wide -> 128; 48 high -> 64 (A1111's multiples of 64)
    assert np.array_equal(out[:12, :24], np.asarray(init)[:12, :24])  # far from the seam (blurred by 8)
    assert parse_infotext(read_parameters("o.png"))["Masked content"] == "fill"


@pytest.mark.parametrize("args,message", [
    (["outpaint", "init.png", "x"], "at least one side"),
    (["outpaint", "init.png", "x", "--left", "8", "--width", "64"], "leave out --width and --height"),
    (["inpaint", "x", "--init-image", "init.png", "--mask", "init.png", "--only-masked-padding", "300"],
     "from 0 to 256"),
    (["img2img", "x", "--init-image", "init.png", "--noise-multiplier", "2"], "between 0 and 1.5"),
])
def test_bad_inpainting_input_is_one_line(args, message, capsys):
    Image.new("RGB", (64, 64), "red").save("init.png")
    assert main(args) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("plainsd: error: ") and message in last


@pytest.mark.parametrize("args,message", [
    (["txt2img", "x", "--width", "100"], "multiples of 8"),
    (["txt2img", "x", "--sampler", "Eulr"], "unknown sampler 'Eulr'; known samplers: DPM++ 2M"),
    (["txt2img", "x", "--schedule", "weird"], "unknown schedule 'weird'"),
    (["txt2img", "x", "--model", "missing.safetensors"], "no such checkpoint"),
    (["txt2img", "x", "-o", "out.jpg"], "must be a .png file"),
    (["img2img", "x", "--init-image", "nothing.png"], "no such image file"),
    (["img2img", "x", "--init-image", "bad.png"], "cannot read image bad.png"),
    (["png-info", "bad.png"], "cannot read image"),
    (["txt2img", "x", "--guidance-until", "0"], "guidance_until (the fraction of the steps with guidance) must be in (0, 1]"),
    (["txt2img", "x", "--token-merging", "0.8", "--backend", "openvino"], "token merging needs the eager UNet"),
    (["txt2img", "x", "--token-merging", "-0.5"], "token merging ratio must be at least 0 and below 1"),
    (["txt2img", "x", "--hires-upscaler", "4x-UltraSharp"], "unknown hires upscaler '4x-UltraSharp'; plainsd has Latent,"),
    (["txt2img", "x", "--hires", "--hires-sampler", "Eulr"], "unknown sampler 'Eulr'"),
    (["txt2img", "x", "--hires-strength", "1.5"], "hires denoising strength must be between 0 and 1"),
    (["txt2img", "x", "--hires-token-merging", "1"], "hires token merging ratio must be at least 0 and below 1"),
    (["txt2img", "x", "--subseed-strength", "2"], "subseed_strength (the variation strength) must be between 0 and 1"),
    (["txt2img", "x", "--seed-resize-from-w", "64"], "seed_resize_from_w and seed_resize_from_h must both be"),
    (["txt2img", "x", "--tiling", "--backend", "openvino"], "tiling needs the eager UNet"),
    (["txt2img", "x", "--sampler", "DPM++ 2M", "--s-churn", "1"], "s_churn is for the samplers Euler, Heun, DPM2;"),
    (["txt2img", "x", "--sampler", "LMS", "--eta", "0.5"], "eta is for the samplers"),
    (["txt2img", "x", "--checkpoints-limit", "2"], "--checkpoints-limit sets how many UNets a --refiner run keeps"),
    # a shipped recipe by name: unet-objects goes on from the earlier runs' files, here absent
    (["train", "unet", "--config", "unet-objects"], "no such checkpoint file or folder: runs/vae-decoder-objects/vae.safetensors"),
    (["train", "vae", "--config", "unet-objects"], "is a unet config, not a vae one"),
    (["train", "vae", "--hint", "canny"], "--hint is for `plainsd train controlnet` only"),
    (["train", "controlnet", "--hint", "depth"], "extra.hint 'depth' of the controlnet recipe is not one it can make; "
                                                 "known: canny"),
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


def test_lora_merge_and_lora_and_embedding_folders(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    import plainsd
    from plainsd import lora
    from plainsd.embeddings import Embedding, save_embedding
    from tests.test_lora import random_lora

    base = plainsd.build("tiny", seed=3)
    plainsd.save(base, tmp_path / "base.safetensors")
    (tmp_path / "loras").mkdir()
    save_file(random_lora(base), str(tmp_path / "loras" / "style.safetensors"))
    assert main(["lora", "merge", "base.safetensors", "loras/style.safetensors", "--weight", "0.5", "-o", "m.safetensors"]) == 0
    assert "at weight 0.5" in capsys.readouterr().out
    merged = plainsd.load(tmp_path / "m.safetensors")
    expected = lora.merge(plainsd.load(tmp_path / "base.safetensors"), lora.read_lora(tmp_path / "loras" / "style.safetensors"), 0.5)
    for a, b in zip(merged.unet.parameters(), expected.unet.parameters()):
        assert torch.equal(a, b)
    # the merged model draws what the tag draws
    common = ["--steps", "3", "--seed", "2", "--width", "32", "--height", "32", "--quiet", "--precision", "fp32"]  # exact equality
    main(["txt2img", "x", "--model", "m.safetensors", "-o", "merged.png"] + common)
    main(["txt2img", "x <lora:style:0.5>", "--model", "base.safetensors", "--lora-dir", "loras", "-o", "tag.png"] + common)
    assert np.array_equal(np.asarray(Image.open("merged.png")), np.asarray(Image.open("tag.png")))
    # an embedding used by name
    (tmp_path / "emb").mkdir()
    vectors = base.text_encoder.text_model.embeddings.token_embedding.weight[base.tokenizer.encode("red")].detach()
    save_embedding(Embedding("crimson", vectors), tmp_path / "emb" / "crimson.safetensors")
    main(["txt2img", "a crimson x", "--model", "base.safetensors", "--embeddings-dir", "emb", "-o", "e.png"] + common)
    main(["txt2img", "a red x", "--model", "base.safetensors", "-o", "r.png"] + common)
    assert np.array_equal(np.asarray(Image.open("e.png")), np.asarray(Image.open("r.png")))
    assert main(["lora", "merge", "base.safetensors", "base.safetensors", "-o", "n.safetensors"]) == 2
    assert "not a LoRA" in capsys.readouterr().err


def test_loss_trend_compares_means_not_single_steps():
    from plainsd.cli import _loss_trend

    losses = [1.0, 0.0] * 20 + [0.2] * 20  # the first step alone (1.0) would overstate the start
    assert _loss_trend(losses) == "loss 0.5000 -> 0.2000 (means of the first and last 20 steps)"
    assert _loss_trend([0.3, 0.1]) == "loss 0.3000 -> 0.1000 (means of the first and last 1 steps)"


def test_tiny_decoder_from_a_file_or_beside_the_model(capsys):
    import shutil

    from safetensors.torch import save_file

    import plainsd
    from plainsd.models.taesd import TinyDecoder

    plainsd.save(plainsd.build("tiny", seed=0), "m.safetensors")
    save_file({k: v.contiguous() for k, v in TinyDecoder(4, 16).state_dict().items()}, "other.safetensors")
    args = ["txt2img", "x", "--steps", "3", "--seed", "2", "--model", "m.safetensors", "--quiet"]
    # asked for, but the model has none beside it and no file is named: one line saying where it goes
    assert main(args + ["--tiny-decoder", "-o", "none.png"]) == 2
    assert "this model has no tiny decoder: put a TAESD decoder file beside" in capsys.readouterr().err
    assert main(args + ["--tiny-decoder", "other.safetensors", "-o", "named.png"]) == 0
    shutil.copy("other.safetensors", "m.taesd.safetensors")
    assert main(args + ["--tiny-decoder", "-o", "beside.png"]) == 0
    assert main(args + ["-o", "exact.png"]) == 0
    assert open("named.png", "rb").read() == open("beside.png", "rb").read()  # the same decoder either way
    assert np.asarray(Image.open("named.png")).tobytes() != np.asarray(Image.open("exact.png")).tobytes()
    assert main(args + ["--tiny-decoder", "m.safetensors"]) == 2  # a whole checkpoint is not a tiny decoder
    assert "is not a TAESD decoder" in capsys.readouterr().err
    save_file({k: v.contiguous() for k, v in TinyDecoder(8, 16).state_dict().items()}, "wide.safetensors")
    assert main(args + ["--tiny-decoder", "wide.safetensors"]) == 2  # latents of another VAE
    assert "wide.safetensors decodes 8-channel latents; this model's have 4" in capsys.readouterr().err


def test_fast_with_openvino_says_what_it_leaves_out(capsys, monkeypatch):
    import plainsd.cli

    def stop(*a, **k):
        raise ValueError("stopped before loading")

    monkeypatch.setattr(plainsd.cli, "_load_model", stop)
    assert main(["txt2img", "x", "--fast", "--backend", "openvino", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--fast stops guidance early but cannot reuse UNet features" in err and "stopped before loading" in err
    assert main(["txt2img", "x", "--fast", "--quiet"]) == 2  # eager: nothing to say
    assert "cannot reuse" not in capsys.readouterr().err


def test_checkpoints_limit_reaches_the_engine(monkeypatch, capsys):
    import plainsd.pipeline

    limits = []

    def stop(engine, request, **kw):
        limits.append(engine.checkpoints_limit)
        raise ValueError("stopped before drawing")

    monkeypatch.setattr(plainsd.pipeline, "generate", stop)
    open("refiner.safetensors", "wb").close()  # read by the pipeline, here stopped before
    for extra in ([], ["--checkpoints-limit", "2"]):
        assert main(["txt2img", "x", "--refiner", "refiner.safetensors", "--quiet", *extra]) == 2
    assert limits == [1, 2] and "stopped before drawing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["txt2img", "x", "--refiner", "refiner.safetensors", "--checkpoints-limit", "11"])
    assert e.value.code == 2 and "invalid choice: 11" in capsys.readouterr().err


def test_detect_writes_the_hint(capsys):
    picture = Image.new("RGB", (96, 64), (255, 255, 255))
    picture.paste((0, 0, 0), (32, 16, 64, 48))
    picture.save("in.png")
    assert main(["detect", "canny", "in.png", "-o", "edges.png", "--resolution", "64"]) == 0
    from plainsd import detectors
    assert np.array_equal(np.asarray(Image.open("edges.png")), np.asarray(detectors.detect("canny", picture, 64)))
    assert main(["detect", "canny", "in.png", "-o", "fit.png", "--width", "64", "--height", "64", "--pixel-perfect"]) == 0
    assert Image.open("fit.png").size == (64, 64) and "fit.png  (64x64)" in capsys.readouterr().out
    with open("pose.json", "w") as f:
        f.write('{"canvas_width": 32, "canvas_height": 24, "people": [{"pose_keypoints_2d": ['
                + ", ".join(["0"] * 3 + ["5", "12", "1", "25", "12", "1"] + ["0"] * 45) + "]}]}")
    assert main(["detect", "openpose_json", "pose.json", "-o", "pose.png"]) == 0
    assert Image.open("pose.png").size == (32, 24) and Image.open("pose.png").getpixel((15, 12)) == (153, 0, 0)


def test_detect_refuses_with_one_line(capsys):
    Image.new("RGB", (64, 64)).save("in.png")
    for args, message in [(["depth_midas"], "the depth_midas preprocessor needs its network's weights"),
                          (["canny", "--threshold-a", "0"], "threshold_a (Low Threshold) must be from 1 to 255"),
                          (["cany"], "unknown ControlNet preprocessor 'cany'"),
                          (["canny", "--pixel-perfect"], "--pixel-perfect and --resize-mode need --width and --height"),
                          (["canny", "--resize-mode", "Just Resize"], "--resize-mode need --width and --height"),
                          (["canny", "--resolution", "0"], "resolution")]:
        assert main(["detect", args[0], "in.png", "-o", "out.png", *args[1:]]) == 2
        assert message in capsys.readouterr().err
    assert main(["detect", "canny", "in.png", "-o", "out.jpg"]) == 2
    assert main(["detect", "openpose_json", "missing.json", "-o", "out.png"]) == 2
    assert "no such pose file: missing.json" in capsys.readouterr().err


def _controlnet_folder(tmp_path):
    import plainsd
    from tests.test_control import random_controlnet, save_controlnet

    (tmp_path / "cn").mkdir()
    tiny = plainsd.build("tiny", seed=0)
    plainsd.save(tiny, tmp_path / "base.safetensors")
    save_controlnet(random_controlnet(tiny.unet.config), tmp_path / "cn" / "edges.safetensors")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save("hint.png")
    Image.new("RGB", (64, 64), (200, 30, 30)).save("init.png")


def test_controlnet_flags_make_the_same_request_as_python(tmp_path):
    import dataclasses

    from plainsd import cli
    from plainsd.request import ControlUnit

    _controlnet_folder(tmp_path)
    args = cli.build_parser().parse_args([
        "img2img", "x", "--init-image", "init.png", "--controlnet-dir", "cn",
        "--controlnet", "edges", "--control-image", "hint.png", "--control-module", "canny", "--control-weight", "0.5",
        "--control-start", "0.1", "--control-end", "0.9", "--control-mode", "controlnet",
        "--control-resize-mode", "resize-and-fill", "--control-res", "256", "--control-threshold-a", "50",
        "--control-threshold-b", "150", "--control-pixel-perfect",
        "--controlnet", "edges", "--control-image", "init", "--control-module", "none", "--control-weight", "1.5",
        "--control-mode", "prompt", "--control-resize-mode", "just-resize", "--control-pixel-perfect", "off"])
    request = cli._request(args)
    hint = Image.open("hint.png")
    expected = (ControlUnit("edges", hint, "canny", 0.5, 0.1, 0.9, "ControlNet is more important", "Resize and Fill",
                            256, 50.0, 150.0, True),
                ControlUnit("edges", None, "none", 1.5, control_mode="My prompt is more important",
                            resize_mode="Just Resize", pixel_perfect=False))
    got = request.controlnet
    assert request.controlnet_dir == "cn" and len(got) == 2
    assert np.array_equal(np.asarray(got[0].image), np.asarray(hint))
    assert [dataclasses.replace(u, image=None) for u in got] == [dataclasses.replace(u, image=None) for u in expected]
    request.check()


def test_controlnet_on_the_command_line_draws_and_writes_its_infotext(tmp_path):
    _controlnet_folder(tmp_path)
    common = ["--steps", "2", "--seed", "1", "--quiet", "--precision", "fp32", "--controlnet-dir", "cn",
              "--model", "base.safetensors"]
    assert main(["txt2img", "x", "-o", "plain.png"] + common) == 0
    assert main(["txt2img", "x", "-o", "cn.png", "--controlnet", "edges", "--control-image", "hint.png"] + common) == 0
    fields = parse_infotext(read_parameters("cn.png"))
    assert fields["ControlNet 0"].startswith("Module: none, Model: edges [")
    assert np.abs(np.asarray(Image.open("cn.png"), np.int16) - np.asarray(Image.open("plain.png"), np.int16)).max() > 10


def test_a_t2i_adapter_as_a_controlnet_unit_on_the_command_line(tmp_path):
    import plainsd
    from plainsd.weights import save_adapter
    from tests.test_control import random_adapter

    _controlnet_folder(tmp_path)
    adapter = random_adapter(plainsd.build("tiny", seed=0).unet.config)
    save_adapter(adapter, tmp_path / "cn" / "t2iadapter_canny_sd15v2.safetensors")
    common = ["--steps", "2", "--seed", "1", "--quiet", "--precision", "fp32", "--controlnet-dir", "cn",
              "--model", "base.safetensors"]
    assert main(["txt2img", "x", "-o", "plain.png"] + common) == 0
    assert main(["txt2img", "x", "-o", "ad.png", "--controlnet", "t2iadapter_canny_sd15v2", "--control-image",
                 "hint.png", "--control-module", "canny"] + common) == 0
    fields = parse_infotext(read_parameters("ad.png"))
    assert fields["ControlNet 0"].startswith("Module: canny, Model: t2iadapter_canny_sd15v2 [")
    assert np.abs(np.asarray(Image.open("ad.png"), np.int16) - np.asarray(Image.open("plain.png"), np.int16)).max() > 10


@pytest.mark.parametrize("args, message", [
    (["--controlnet", "nope", "--control-image", "hint.png"], "no ControlNet named 'nope'"),
    (["--controlnet", "edges", "--control-image", "hint.png", "--control-weight", "1", "--control-weight", "2"],
     "--control-weight was given 2 times but --controlnet 1 times"),
    (["--control-module", "canny"], "--control-module was given 1 times but --controlnet 0 times"),
    (["--controlnet", "edges"], "needs an image"),
    (["--controlnet", "edges", "--control-image", "hint.png", "--control-weight", "3"], "weight must be between 0 and 2"),
    (["--controlnet", "edges", "--control-image", "hint.png", "--control-res", "big"], "--control-res takes a whole number"),
])
def test_bad_controlnet_flags_exit_2(args, message, tmp_path, capsys):
    _controlnet_folder(tmp_path)
    assert main(["txt2img", "x", "--controlnet-dir", "cn", "--quiet"] + args) == 2
    assert message in capsys.readouterr().err


def test_a_bad_control_mode_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["txt2img", "x", "--controlnet", "a", "--control-mode", "strong"])
    assert e.value.code == 2 and "invalid choice: 'strong'" in capsys.readouterr().err
