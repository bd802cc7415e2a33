"""The model plainsd ships: its file, its card, its settings, and that it draws what it is told."""

import json

import pytest
import torch
from safetensors import safe_open

import plainsd
from plainsd import runtime
from plainsd.eval import metrics
from plainsd.eval.judge import detect
from plainsd.pipeline import txt2img
from plainsd.weights import DEFAULT_MODEL


def test_shipped_file_is_small_fp16_original_layout_with_its_settings():
    assert DEFAULT_MODEL.is_file() and DEFAULT_MODEL.stat().st_size <= 24 * 2**20
    f = safe_open(str(DEFAULT_MODEL), "pt")
    keys = list(f.keys())
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)
    assert f.get_tensor(keys[0]).dtype.is_floating_point and str(f.get_tensor(keys[0]).dtype) == "torch.float16"
    defaults = json.loads(f.metadata()["plainsd.defaults"])
    assert defaults == {"steps": 20, "sampler": "DPM++ 2M", "schedule": "karras", "cfg_scale": 5.0, "guidance_until": 0.6,
                        "width": 64, "height": 64,
                        "with_lora": {"lora": "plainsd-base.lcm-lora", "steps": 4, "sampler": "LCM",
                                      "schedule": "automatic", "cfg_scale": 1.0, "guidance_until": 1.0}}
    card = DEFAULT_MODEL.with_suffix(".md").read_text()
    assert "| single object: colour and shape |" in card and "Total training time" in card


def test_the_plain_call_uses_the_cards_settings():
    """Sampler left out (or LCM): the LCM-LoRA's 4 steps, its tag added to the prompt; another sampler: the 20-step
    settings; the tag at weight 0 leaves the LoRA out (the base model's picture, no tag added)."""
    sd = plainsd.load()
    result = txt2img(sd, "a red circle on the left", seed=1)
    p = result.parameters
    assert (p.steps, p.sampler, p.cfg_scale, p.width) == (4, "LCM", 1.0, 64)
    assert p.prompt == "a red circle on the left <lora:plainsd-base.lcm-lora:1>"
    assert "LoRA plainsd-base.lcm-lora" in p.notes[0]
    named = txt2img(sd, "a red circle on the left", seed=1, sampler="lcm")
    assert named.parameters.prompt == p.prompt and named.images[0].tobytes() == result.images[0].tobytes()
    tagged = txt2img(sd, "a red circle on the left <lora:plainsd-base.lcm-lora:1>", seed=1)
    assert tagged.parameters.prompt == p.prompt and tagged.images[0].tobytes() == result.images[0].tobytes()
    off = txt2img(sd, "a red circle on the left <lora:plainsd-base.lcm-lora:0>", seed=1)
    bare = plainsd.load()
    bare.defaults = {}  # (no recommendations: nothing added to the prompt)
    base = txt2img(bare, "a red circle on the left", seed=1, steps=4, sampler="LCM", cfg_scale=1.0)
    assert off.parameters.prompt.endswith(":0>") and off.images[0].tobytes() == base.images[0].tobytes()
    assert base.images[0].tobytes() != result.images[0].tobytes()
    full = txt2img(sd, "a red circle on the left", seed=1, sampler="DPM++ 2M")
    p = full.parameters
    assert (p.steps, p.sampler, p.schedule, p.cfg_scale, p.width) == (20, "DPM++ 2M", "karras", 5.0, 64)
    assert p.prompt == "a red circle on the left" and "lora" not in full.infotexts[0]
    assert p.guidance_until == 0.6 and "Guidance until: 0.6" in full.infotexts[0]


def test_it_draws_what_it_is_told():
    # The card's figures on 100 held-out prompts: colour and shape 0.96, position 0.99, size 0.98; the first 20
    # score 0.95 / 1.0 / 1.0. The same seeds give the same pictures; a broken loader, sampler or prompt path
    # falls far below.
    sd = plainsd.load()
    score = metrics.adherence(sd, 20)
    assert score["position"] >= 0.9 and score["size"] >= 0.9 and score["colour_and_shape"] >= 0.85, score


def test_its_lcm_lora_draws_what_it_is_told_in_4_steps():
    # benchmarks/lcm_adherence.md on 100 held-out prompts: colour and shape 0.94 at 4 steps (the 20-step path 0.96),
    # position 1.00, size 0.97; without the LoRA the LCM sampler's 4 steps give 0.84. On these first 20 (float32)
    # the LoRA gets all three right in every picture, the model without it in 18.
    sd = plainsd.load()
    score = metrics.adherence(sd, 20, steps=4, sampler="LCM", schedule="automatic", cfg_scale=1.0)  # (tag added)
    assert score["all"] >= 0.95, score


@pytest.mark.slow
def test_prompt_editing_switches_the_colour_when_it_says():
    # benchmarks/prompt_editing.py's table, as a test: switching to "a blue circle" after 30% of the steps draws
    # blue (46 of its 50 seeds; 22 of the first 25, taken here), after 90% red (50 of 50; 25 of 25); literal text
    # or a switch at the wrong step would not. A batch of 25 draws seeds 0-24: the pictures of 25 single calls (to
    # the 8-bit rounding) in less time.
    engine = runtime.prepare(plainsd.load())

    def colours(prompt: str) -> list:
        pictures = txt2img(engine, prompt, seed=0, batch_size=25, sampler="DPM++ 2M").images
        found = [detect(picture)[1] for picture in pictures]
        return [objects[0].colour if objects else None for objects in found]

    early, late = colours("[a red circle:a blue circle:0.3]"), colours("[a red circle:a blue circle:0.9]")
    assert early.count("blue") >= 20 and late.count("red") >= 23, (early, late)


def test_shipped_controlnet_is_fp16_in_the_original_layout_with_its_recipe():
    from plainsd.models.controlnet import ControlNet

    path = DEFAULT_MODEL.with_name("plainsd-base.controlnet-canny.safetensors")
    f = safe_open(str(path), "pt")
    names = set(ControlNet(plainsd.load().unet.config).state_dict())
    assert set(f.keys()) == names  # lllyasviel's keys, no prefix: other tools read it as a ControlNet 1.x file
    assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    recipe = json.loads(f.metadata()["plainsd.recipe"])
    assert recipe["network"] == "controlnet" and recipe["extra"]["hint"] == "canny"
    assert "## Measured" in path.with_suffix(".md").read_text()


@pytest.mark.slow
def test_the_shipped_controlnet_draws_the_edges_shape_where_they_are():
    # benchmarks/controlnet_adherence.md's figure, as a test: with the canny edges of a held-out scene and a prompt
    # that names only its colour, the picture has the scene's shape at its position (pixel perfect); without the
    # unit, by chance. A unit that did not reach the UNet, or a hint made wrong, falls to chance.
    from plainsd.eval.judge import judge
    from plainsd.request import ControlUnit
    from plainsd.train.data import Scene, render

    engine = runtime.prepare(plainsd.load())

    def share(with_unit: bool) -> float:
        hits = 0
        for i, s in enumerate(metrics.held_out_scenes(20, 1)):
            units = (ControlUnit("plainsd-base.controlnet-canny", render(s, 64), module="canny", pixel_perfect=True),)
            prompt = f"a {s.objects[0].colour}"
            picture = txt2img(engine, prompt, seed=i, controlnet=units if with_unit else (),
                              sampler="DPM++ 2M").images[0]
            hits += all(judge(picture, Scene(s.objects, s.background, "", [{"shape", "position"}]))[0].values())
        return hits / 20

    with_edges, alone = share(True), share(False)
    assert with_edges >= 0.4 and alone <= 0.2, (with_edges, alone)
