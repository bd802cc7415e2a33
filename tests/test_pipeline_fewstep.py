"""Few-step generation through the public pipeline: CFG scale 1 without the unconditional half, LCM and TCD with
the timesteps their references use, and an SD-Turbo file's defaults."""

import numpy as np
import pytest
import torch

import plainsd
from plainsd import pipeline
from plainsd.pnginfo import parse_infotext
from plainsd.weights import TURBO_DEFAULTS


@pytest.fixture(scope="module")
def sd():
    return plainsd.build("tiny", seed=0)


class UNetCalls:
    """Records the batch size and timesteps of every UNet call while in use."""

    def __init__(self, unet):
        self.unet, self.batches, self.timesteps = unet, [], []

    def __enter__(self):
        self.hook = self.unet.register_forward_hook(self.record)
        return self

    def record(self, module, args, out):
        self.batches.append(args[0].shape[0])
        self.timesteps.append(args[1].reshape(-1)[0].item())

    def __exit__(self, *exc):
        self.hook.remove()


def _arr(image):
    return np.asarray(image, dtype=np.int16)


def test_cfg_scale_1_skips_the_unconditional_half(sd):
    """At CFG 1 each step is one UNet call on the prompt alone, so the negative prompt changes nothing (and the run
    says so); at CFG 5 each call carries the negative prompt's half too, and it changes the picture."""
    runs = {}
    for cfg in (1.0, 5.0):
        for negative in ("", "blurry"):
            with UNetCalls(sd.unet) as calls:
                result = pipeline.txt2img(sd, "a red circle", negative, steps=3, seed=5, cfg_scale=cfg,
                                          sampler="Euler", batch_size=2)
            runs[cfg, negative] = (result, calls.batches)
    assert runs[1.0, "blurry"][1] == [2, 2, 2]   # two images, no unconditional rows
    assert runs[5.0, "blurry"][1] == [4, 4, 4]   # two images and their negative prompts
    same = [np.array_equal(_arr(a), _arr(b)) for a, b in zip(runs[1.0, ""][0].images, runs[1.0, "blurry"][0].images)]
    assert all(same)
    assert not np.array_equal(_arr(runs[5.0, ""][0].images[0]), _arr(runs[5.0, "blurry"][0].images[0]))
    assert any("negative prompt has no effect" in n for n in runs[1.0, "blurry"][0].parameters.notes)
    assert not any("negative prompt" in n for n in runs[5.0, "blurry"][0].parameters.notes)
    assert not any("negative prompt" in n for n in runs[1.0, ""][0].parameters.notes)


@pytest.mark.parametrize("schedule,timesteps", [
    (None, [999, 679, 339, 19]),               # A1111's LCM, "Automatic"
    ("lcm", [999, 759, 499, 259]),             # diffusers' LCMScheduler's choice
])
def test_lcm_calls_the_unet_on_the_distillation_timesteps(sd, schedule, timesteps):
    with UNetCalls(sd.unet) as calls:
        result = pipeline.txt2img(sd, "x", steps=4, seed=1, sampler="LCM", schedule=schedule, cfg_scale=1.0)
    assert calls.timesteps == pytest.approx(timesteps) and calls.batches == [1] * 4
    fields = parse_infotext(result.infotexts[0])
    assert fields["Sampler"] == "LCM" and fields["Schedule type"] == ("Normal" if schedule is None else "LCM")


def test_lcm_img2img_and_hires_use_the_lcm_timesteps(sd):
    """A pass's sigmas come from the LCM table for img2img's last part and the hires fix's second pass too."""
    first = pipeline.txt2img(sd, "x", steps=4, seed=2, sampler="LCM", cfg_scale=1.0).images[0]
    with UNetCalls(sd.unet) as calls:
        pipeline.img2img(sd, first, "x", steps=4, seed=2, sampler="LCM", cfg_scale=1.0, strength=0.5)
    assert set(calls.timesteps) <= {20 * k + 19 for k in range(50)} and len(calls.timesteps) == 3
    with UNetCalls(sd.unet) as calls:
        pipeline.txt2img(sd, "x", steps=2, seed=2, sampler="LCM", cfg_scale=1.0,
                         hires=pipeline.HiresFix(scale=1.5, steps=2, strength=0.5))
    assert calls.timesteps == pytest.approx([999, 19, 339, 19])  # the second pass: the end of 4 steps


def test_tcd_takes_gamma_from_eta(sd):
    """TCD's gamma is the request's eta (0.3 when left out, written as Eta only when set); more than 1 is refused."""
    default = pipeline.txt2img(sd, "x", steps=4, seed=3, sampler="TCD", cfg_scale=1.0)
    same = pipeline.txt2img(sd, "x", steps=4, seed=3, sampler="TCD", cfg_scale=1.0, eta=0.3)
    other = pipeline.txt2img(sd, "x", steps=4, seed=3, sampler="TCD", cfg_scale=1.0, eta=0.8)
    assert np.array_equal(_arr(default.images[0]), _arr(same.images[0]))
    assert not np.array_equal(_arr(default.images[0]), _arr(other.images[0]))
    assert "Eta" not in parse_infotext(default.infotexts[0]) and parse_infotext(other.infotexts[0])["Eta"] == "0.8"
    with pytest.raises(ValueError, match="TCD's eta"):
        pipeline.txt2img(sd, "x", steps=2, sampler="TCD", eta=1.5)


def test_turbo_defaults_apply_where_the_request_leaves_them_out(tmp_path):
    """A Turbo file runs Euler a, SGM Uniform, CFG 1 for 1 step at 512 unless the request says otherwise, and the
    run says which of its settings came from the model."""
    sd = plainsd.build("tiny-sd2", seed=0)
    plainsd.save(sd, tmp_path / "x.safetensors")
    path = tmp_path / "sd_turbo.safetensors"
    (tmp_path / "x.safetensors").rename(path)
    turbo = plainsd.load(path)
    assert turbo.defaults == TURBO_DEFAULTS
    with UNetCalls(turbo.unet) as calls:
        r = pipeline.txt2img(turbo, "x", "blurry", seed=1, width=64, height=64)
    fields = parse_infotext(r.infotexts[0])
    assert (fields["Steps"], fields["Sampler"], fields["Schedule type"], fields["CFG scale"]) == \
        ("1", "Euler a", "SGM Uniform", "1")
    assert calls.batches == [1] and calls.timesteps == pytest.approx([999])
    assert any("recommended settings used" in n and "steps 1" in n and "width" not in n for n in r.parameters.notes)
    mine = pipeline.txt2img(turbo, "x", seed=1, width=64, height=64, steps=2, cfg_scale=2.0, sampler="Euler")
    fields = parse_infotext(mine.infotexts[0])
    assert (fields["Steps"], fields["Sampler"], fields["CFG scale"]) == ("2", "Euler", "2")
    # a schedule recommended with Euler a is not one for the Euler the request chose: Euler's own applies
    assert mine.parameters.schedule == "normal" and not any("recommended" in n for n in mine.parameters.notes)
