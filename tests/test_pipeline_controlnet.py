"""ControlNet units through the pipeline on tiny random weights: txt2img, img2img, inpainting, hires, fast mode."""

import numpy as np
import pytest
import torch
from PIL import Image

import plainsd
from plainsd import control, pipeline
from plainsd.pnginfo import parse_controlnet_units, parse_infotext
from plainsd.request import ControlUnit, GenerationRequest, HiresFix
from plainsd.runtime import Engine
from tests.test_control import random_controlnet, save_controlnet, stand_ins  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def sd():
    return plainsd.build("tiny", seed=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, sd):
    root = tmp_path_factory.mktemp("ControlNet")
    save_controlnet(random_controlnet(sd.unet.config, 0), root / "cn_a.safetensors")
    save_controlnet(random_controlnet(sd.unet.config, 1), root / "cn_b.safetensors")
    save_controlnet(random_controlnet(sd.unet.config, 2, in_channels=4), root / "cn_4.safetensors")
    return root


def _picture(seed=0, size=(64, 64)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


def _request(folder, units, **kw):
    kw = {"steps": 4, "seed": 3, "sampler": "Euler", **kw}
    return GenerationRequest("a red circle", controlnet=tuple(units), controlnet_dir=str(folder), **kw)


def _arr(image):
    return np.asarray(image, dtype=np.int16)


class Spy:
    """Wraps the engine's UNet and records each call's control (None or the residuals)."""

    def __init__(self, unet):
        self.unet, self.controls = unet, []

    def __call__(self, x, t, context, control=None):
        self.controls.append(control)
        return self.unet(x, t, context, control=control)


def _spied(sd):
    engine = Engine(sd)
    engine.unet = Spy(sd.unet)
    return engine


def test_weight_zero_is_no_unit_bit_for_bit_and_a_unit_changes_the_picture(sd, folder):
    plain = pipeline.generate(sd, _request(folder, []))
    zero = pipeline.generate(sd, _request(folder, [ControlUnit("cn_a", _picture(), weight=0.0)]))
    on = pipeline.generate(sd, _request(folder, [ControlUnit("cn_a", _picture())]))
    assert np.array_equal(_arr(plain.images[0]), _arr(zero.images[0]))
    assert np.abs(_arr(plain.images[0]) - _arr(on.images[0])).max() > 10


def test_guidance_start_end_change_exactly_those_steps(sd, folder):
    """10 Euler steps, guidance 0.3-0.6: the model calls of steps 4-7 get residuals (the extension's rule)."""
    engine = _spied(sd)
    pipeline.generate(engine, _request(folder, [ControlUnit("cn_a", _picture(), guidance_start=0.3,
                                                            guidance_end=0.6)], steps=10))
    assert [i for i, c in enumerate(engine.unet.controls) if c is not None] == [4, 5, 6, 7]


def test_the_unconditional_half_by_mode(sd, folder):
    for mode, uncond_gets in ((0, True), (1, True), (2, False)):
        engine = _spied(sd)
        pipeline.generate(engine, _request(folder, [ControlUnit("cn_a", _picture(), control_mode=mode)], steps=2,
                                           batch_size=2, cfg_scale=5.0))
        control = engine.unet.controls[0]
        assert control[0].shape[0] == 4  # two images, guided: unconditional rows 0-1 first
        assert bool((control[-1][:2] != 0).any()) == uncond_gets and bool((control[-1][2:] != 0).any())


def test_the_controlnet_sees_the_unets_text(sd, folder, monkeypatch):
    seen = []
    real = control.run_controlnet
    monkeypatch.setattr(control, "run_controlnet", lambda net, x, hint, t, context, stop=None:
                        seen.append(context.clone()) or real(net, x, hint, t, context, stop))
    engine = _spied(sd)
    texts = []
    inner = engine.unet.__call__
    engine.unet = lambda x, t, context, control=None: texts.append(context.clone()) or inner(x, t, context, control)
    pipeline.generate(engine, _request(folder, [ControlUnit("cn_a", _picture())], steps=2, cfg_scale=5.0,
                                       negative_prompt="blue"))
    assert len(seen) == len(texts) == 2 and all(torch.equal(a, b) for a, b in zip(seen, texts))


def test_img2img_without_an_image_uses_the_init_image(sd, folder):
    init = _picture(5)
    kw = dict(init_image=init, strength=0.6)
    implicit = pipeline.generate(sd, _request(folder, [ControlUnit("cn_a")], **kw))
    explicit = pipeline.generate(sd, _request(folder, [ControlUnit("cn_a", init, resize_mode=0)], **kw))
    other = pipeline.generate(sd, _request(folder, [ControlUnit("cn_a", _picture(6), resize_mode=0)], **kw))
    assert np.array_equal(_arr(implicit.images[0]), _arr(explicit.images[0]))  # (img2img's "just resize")
    assert not np.array_equal(_arr(implicit.images[0]), _arr(other.images[0]))
    with pytest.raises(ValueError, match="needs an image"):
        pipeline.generate(sd, _request(folder, [ControlUnit("cn_a")]))


def test_inpainting_models_and_masks(sd, folder):
    inpaint = plainsd.build("tiny-inpaint", seed=0)
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    for model, name in ((sd, "cn_a"), (inpaint, "cn_4")):
        engine = _spied(model)
        r = pipeline.generate(engine, _request(folder, [ControlUnit(name)], init_image=_picture(5), mask=mask,
                                               strength=0.9))
        assert r.images[0].size == (64, 64) and engine.unet.controls[0] is not None


def test_hires_pass_gets_a_hint_of_its_size(sd, folder, monkeypatch):
    sizes = []
    real = control.hint_tensor
    monkeypatch.setattr(control, "hint_tensor", lambda d, w, h, r: sizes.append((w, h)) or real(d, w, h, r))
    engine = _spied(sd)
    r = pipeline.generate(engine, _request(folder, [ControlUnit("cn_a", _picture(), module="canny")],
                                           hires=HiresFix(scale=1.5, steps=2, strength=0.5)))
    assert sizes == [(64, 64), (96, 96)] and r.images[0].size == (96, 96)
    controls = [c for c in engine.unet.controls if c is not None]
    assert controls[0][0].shape[-1] == 8 and controls[-1][0].shape[-1] == 12  # latents of 64 and 96 pixels


def test_infotext_and_parsing_it_back(sd, folder):
    units = [ControlUnit("cn_a", _picture(), module="canny", weight=0.5, control_mode=1),
             ControlUnit("cn_b", _picture(1), guidance_start=0.2)]
    r = pipeline.generate(sd, _request(folder, units))
    fields = parse_infotext(r.infotexts[0])
    short = control.model_hash(folder / "cn_a.safetensors")
    assert fields["ControlNet 0"].startswith(f"Module: canny, Model: cn_a [{short}], Weight: 0.5, ")
    parsed = parse_controlnet_units(fields)
    assert [p["model"] for p in parsed] == [f"cn_a [{short}]", f"cn_b [{control.model_hash(folder / 'cn_b.safetensors')}]"]
    assert parsed[0]["control_mode"] == "My prompt is more important" and parsed[1]["guidance_start"] == 0.2
    assert parsed[0]["pixel_perfect"] is False and parsed[0]["processor_res"] == 512


def test_fast_mode_and_token_merging_combine(sd, folder):
    fast = pipeline.generate(sd, _request(folder, [ControlUnit("cn_a", _picture())], steps=6,
                                          fast=plainsd.fast.FAST, token_merging=0.5))
    plain = pipeline.generate(sd, _request(folder, [], steps=6, fast=plainsd.fast.FAST, token_merging=0.5))
    assert np.abs(_arr(plain.images[0]) - _arr(fast.images[0])).max() > 10


def test_unknown_model_and_backend_are_refused(sd, folder):
    with pytest.raises(ValueError, match="no ControlNet named 'nope'"):
        pipeline.generate(sd, _request(folder, [ControlUnit("nope", _picture())]))
    with pytest.raises(ValueError, match="ControlNet units need the eager UNet"):
        _request(folder, [ControlUnit("cn_a", _picture())]).check(backend="openvino")
