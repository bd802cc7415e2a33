"""Prompt editing, alternation and AND through the pipeline (tiny random model): txt2img, img2img, inpainting and
the hires fix's pass each follow A1111's schedule; every distinct text is encoded once per run."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

import plainsd
from plainsd import pipeline
from plainsd.pipeline import HiresFix
from plainsd.pnginfo import parse_infotext

RED, BLUE = "a red circle", "a blue square"


@pytest.fixture(scope="module")
def sd():
    return plainsd.build("tiny", seed=0)


def _px(result):
    return np.asarray(result.images[0], dtype=np.int16)


def _same(a, b):
    return np.array_equal(_px(a), _px(b))


def _txt(sd, prompt, **kw):
    return pipeline.txt2img(sd, prompt, **{"steps": 6, "seed": 3, "cfg_scale": 5.0, **kw})


def test_an_edit_at_the_last_step_or_at_zero_is_one_text_throughout(sd):
    red, blue = _txt(sd, RED), _txt(sd, BLUE)
    assert not _same(red, blue)
    assert _same(_txt(sd, f"[{RED}:{BLUE}:6]"), red)
    assert _same(_txt(sd, f"[{RED}:{BLUE}:0]"), blue)
    halfway = _txt(sd, f"[{RED}:{BLUE}:0.5]")
    assert not _same(halfway, red) and not _same(halfway, blue)
    assert parse_infotext(halfway.infotexts[0])["Prompt"] == f"[{RED}:{BLUE}:0.5]"  # the prompt as written


def test_alternating_a_text_with_itself_is_that_text(sd):
    assert _same(_txt(sd, f"[{RED}|{RED}]"), _txt(sd, RED))
    assert not _same(_txt(sd, f"[{RED}|{BLUE}]"), _txt(sd, RED))


def _latents(sd, prompt, **kw):
    """The final estimate of the clean latents (the tiny random model's pictures hardly depend on guidance)."""
    seen = []
    _txt(sd, prompt, callback=lambda info: seen.append(info.denoised), **kw)
    return seen[-1]


def _gap(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_and_of_a_prompt_with_itself_doubles_the_guidance(sd):
    twice = _latents(sd, f"{RED} AND {RED}", cfg_scale=5.0)
    assert _gap(twice, _latents(sd, RED, cfg_scale=10.0)) < 1e-4
    assert _gap(twice, _latents(sd, RED, cfg_scale=5.0)) > 1e-2


def test_a_part_of_weight_zero_changes_nothing(sd):
    plain = _latents(sd, RED)
    assert _gap(_latents(sd, f"{RED} AND {BLUE}:0"), plain) < 1e-4
    assert _gap(_latents(sd, f"{RED} AND {BLUE}:0.7"), plain) > 1e-2


def test_negative_prompt_is_scheduled_too(sd):
    assert _same(_txt(sd, RED, negative_prompt=f"[{BLUE}:blurry:6]"), _txt(sd, RED, negative_prompt=BLUE))
    assert _same(_txt(sd, RED, negative_prompt=f"[{BLUE}|{BLUE}]"), _txt(sd, RED, negative_prompt=BLUE))


def test_parts_of_other_lengths_share_one_batch(sd):
    long = ", ".join(["a red circle"] * 30)
    assert len(_txt(sd, f"{long} AND {BLUE}", steps=2).images) == 1


def test_a_long_text_later_in_the_schedule_does_not_pad_the_steps_before_it(sd):
    # each step's texts are padded to their own longest, not to the schedule's: the steps before a switch to a
    # text of two chunks are those of the short text alone (A1111 never pads them). Steps 0-5 of 6 are "until 5".
    long = ", ".join([BLUE] * 30)
    assert _same(_txt(sd, f"[{RED}:{long}:5]"), _txt(sd, RED))
    assert not _same(_txt(sd, f"[{RED}:{long}:3]"), _txt(sd, RED))


def test_each_distinct_text_is_encoded_once_per_run(sd, monkeypatch):
    texts = []
    forward = type(sd.text_encoder).forward
    monkeypatch.setattr(type(sd.text_encoder), "forward",
                        lambda self, ids, **kw: texts.append(ids.shape[0]) or forward(self, ids, **kw))
    _txt(sd, "[a|b] AND c:0.5", negative_prompt="[d:e:2]", batch_size=2, batch_count=2,
         hires=HiresFix(scale=1.5, steps=4, strength=0.5))
    assert len(texts) == 5  # a, b, c, d, e: not per step, per image, per batch or per pass


def _init():
    image = Image.new("RGB", (64, 64), "navy")
    ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill="yellow")
    return image


def test_img2img_schedule_is_for_all_the_steps_asked_for(sd):
    """8 steps at strength 0.5 run the last 4; [x:y:0.5] ends at step 4 of 8, so x covers all 4 run (counted from
    0), as in A1111. A schedule made for the 4 steps run would switch after 2."""
    run = lambda prompt: pipeline.img2img(sd, _init(), prompt, steps=8, strength=0.5, seed=2)  # noqa: E731
    assert _same(run(f"[{RED}:{BLUE}:0.5]"), run(RED))
    assert not _same(run(f"[{RED}:{BLUE}:0.2]"), run(RED))


@pytest.mark.parametrize("preset", ["tiny", "tiny-inpaint"])
def test_inpainting_follows_the_schedule(preset):
    model = plainsd.build(preset, seed=0)
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 48, 48), fill=255)
    run = lambda prompt: pipeline.inpaint(model, _init(), mask, prompt, steps=6, seed=4, strength=1.0)  # noqa: E731
    assert _same(run(f"[{RED}:{BLUE}:0]"), run(BLUE))
    assert _same(run(f"[{BLUE}|{BLUE}]"), run(BLUE))
    assert not _same(run(f"[{RED}:{BLUE}:3]"), run(BLUE))


def test_hires_pass_continues_the_first_pass_timeline(sd):
    """[x:y:6] at 6 steps is x for the whole first pass; in the hires pass step numbers count on from 6, so it is
    y there (A1111's hires_steps): the same as x with a hires prompt of y."""
    hires = dict(scale=1.5, steps=4, strength=0.6)
    edited = _txt(sd, f"[{RED}:{BLUE}:6]", hires=HiresFix(**hires))
    assert _same(edited, _txt(sd, RED, hires=HiresFix(**hires, prompt=BLUE)))
    assert not _same(edited, _txt(sd, RED, hires=HiresFix(**hires)))
    # a hires prompt of its own is scheduled on the hires steps: 1.25 ends at step 2 of 8, of the 4 run
    longer = dict(scale=1.5, steps=8, strength=0.5)
    own = _txt(sd, RED, hires=HiresFix(**longer, prompt=f"[{RED}:{BLUE}:1.25]"))
    assert not _same(own, _txt(sd, RED, hires=HiresFix(**longer)))
    assert not _same(own, _txt(sd, RED, hires=HiresFix(**longer, prompt=BLUE)))
