"""ControlNet units through the pipeline on tiny random weights: txt2img, img2img, inpainting, hires, fast mode."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import plainsd
from plainsd import control, pipeline
from plainsd.models.controlnet import ControlNet
from plainsd.pnginfo import parse_controlnet_units, parse_infotext
from plainsd.request import ControlUnit, GenerationRequest, HiresFix
from plainsd.runtime import Engine
from plainsd.models.t2i_adapter import T2IAdapter
from plainsd.weights import save_adapter
from tests.test_control import random_adapter, random_controlnet, save_controlnet


@pytest.fixture(scope="module")
def sd():
    return plainsd.build("tiny", seed=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, sd):
    root = tmp_path_factory.mktemp("ControlNet")
    save_controlnet(random_controlnet(sd.unet.config, 0), root / "cn_a.safetensors")
    save_controlnet(random_controlnet(sd.unet.config, 1), root / "cn_b.safetensors")
    save_controlnet(random_controlnet(sd.unet.config, 2, in_channels=4), root / "cn_4.safetensors")
    save_adapter(random_adapter(sd.unet.config, 3), root / "t2iadapter_a.safetensors")
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


@pytest.mark.parametrize("prompt, kw, rows", [
    # AND parts x 2 images: rows 0-1 unconditional, 2-5 the two parts' conditional rows
    ("a red circle AND a blue square", dict(batch_size=2, cfg_scale=5.0), [[False] * 2 + [True] * 4] * 4),
    # guidance cut off after half the steps: the later calls have no unconditional rows, so all get residuals
    ("a red circle AND a blue square", dict(batch_size=2, cfg_scale=5.0, guidance_until=0.5),
     [[False] * 2 + [True] * 4] * 2 + [[True] * 4] * 2),
    ("a red circle", dict(batch_size=3, cfg_scale=1.0), [[True] * 3] * 4),   # no guidance: conditional rows only
])
def test_controlnet_is_more_important_finds_the_unconditional_rows(sd, folder, prompt, kw, rows):
    engine = _spied(sd)
    request = _request(folder, [ControlUnit("cn_a", _picture(), control_mode=2)], **kw)
    pipeline.generate(engine, dataclasses.replace(request, prompt=prompt))
    got = [[bool((c[-1][i] != 0).any()) for i in range(c[-1].shape[0])] for c in engine.unet.controls]
    assert got == rows


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
    real = ControlNet.forward
    monkeypatch.setattr(ControlNet, "forward", lambda net, x, hint, t, context, stop=None, y=None:
                        seen.append(context.clone()) or real(net, x, hint, t, context, stop, y))
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


# --- T2I-Adapter units -------------------------------------------------------------------------------------------------

class AdapterSpy(Spy):
    """Also records each call's adapter features (None or one map per level)."""

    def __init__(self, unet):
        super().__init__(unet)
        self.adapters = []

    def __call__(self, x, t, context, control=None, adapter=None):
        self.controls.append(control)
        self.adapters.append(adapter)
        return self.unet(x, t, context, control=control, adapter=adapter)


def _adapter_spied(sd):
    engine = Engine(sd)
    engine.unet = AdapterSpy(sd.unet)
    return engine


def test_an_adapter_unit_changes_the_picture_and_weight_zero_is_no_unit(sd, folder):
    plain = pipeline.generate(sd, _request(folder, []))
    zero = pipeline.generate(sd, _request(folder, [ControlUnit("t2iadapter_a", _picture(), weight=0.0)]))
    on = pipeline.generate(sd, _request(folder, [ControlUnit("t2iadapter_a", _picture())]))
    assert np.array_equal(_arr(plain.images[0]), _arr(zero.images[0]))
    assert np.abs(_arr(plain.images[0]) - _arr(on.images[0])).max() > 10


def test_adapter_features_once_a_pass_and_only_on_the_conditional_half_in_controlnet_mode(sd, folder, monkeypatch):
    runs = []
    real = T2IAdapter.forward
    monkeypatch.setattr(T2IAdapter, "forward", lambda net, hint: runs.append(hint.shape) or real(net, hint))
    for mode, uncond_gets in ((0, True), (2, False)):
        runs.clear()
        engine = _adapter_spied(sd)
        pipeline.generate(engine, _request(folder, [ControlUnit("t2iadapter_a", _picture(), control_mode=mode)],
                                           steps=3, batch_size=2, batch_count=2, cfg_scale=5.0,
                                           hires=HiresFix(scale=1.5, steps=2, strength=0.5)))
        assert runs == [(1, 3, 64, 64), (1, 3, 96, 96)]  # two batches, two passes: once per pass
        assert all(a is not None and c is None for a, c in zip(engine.unet.adapters, engine.unet.controls))
        first, last = engine.unet.adapters[0], engine.unet.adapters[-1]
        assert first[0].shape[-1] == 8 and last[0].shape[-1] == 12  # the hires pass's own features
        rows = first[-1].expand(4, -1, -1, -1)  # two images, guided: unconditional rows 0-1 first
        assert bool((rows[:2] != 0).any()) == uncond_gets and bool((rows[2:] != 0).any())


def test_a_controlnet_and_an_adapter_unit_together(sd, folder):
    pictures = {}
    for names in (("cn_a",), ("t2iadapter_a",), ("cn_a", "t2iadapter_a")):
        engine = _adapter_spied(sd)
        pictures[names] = _arr(pipeline.generate(engine, _request(folder, [ControlUnit(n, _picture()) for n in names]))
                               .images[0])
        assert all((c is not None) == ("cn_a" in names) and (a is not None) == ("t2iadapter_a" in names)
                   for c, a in zip(engine.unet.controls, engine.unet.adapters))
    both = pictures["cn_a", "t2iadapter_a"]
    # (the ControlNet's residuals dwarf the random adapter's features; the exact split is in test_control)
    assert np.abs(both - pictures["cn_a",]).max() > 4 and np.abs(both - pictures["t2iadapter_a",]).max() > 10


def test_adapter_units_with_fast_mode_sizes_of_8_px_and_infotext(sd, folder):
    unit = ControlUnit("t2iadapter_a", _picture(), module="canny", weight=0.5)
    fast = pipeline.generate(sd, _request(folder, [unit], steps=6, fast=plainsd.fast.FAST))
    plain = pipeline.generate(sd, _request(folder, [], steps=6, fast=plainsd.fast.FAST))
    assert np.abs(_arr(plain.images[0]) - _arr(fast.images[0])).max() > 10
    odd = pipeline.generate(sd, _request(folder, [unit], width=72, height=40))
    assert odd.images[0].size == (72, 40)
    short = control.model_hash(folder / "t2iadapter_a.safetensors")
    assert parse_infotext(odd.infotexts[0])["ControlNet 0"].startswith(
        f"Module: canny, Model: t2iadapter_a [{short}], Weight: 0.5, ")
