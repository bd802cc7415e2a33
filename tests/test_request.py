"""GenerationRequest: each rule gives one sentence; what None, 0 and -1 mean; the hires fix's sampler; Parameters."""

import pytest
from PIL import Image

from plainsd.fast import FAST
from plainsd.pnginfo import parse_infotext
from plainsd.request import MAX_SEED, GenerationRequest, HiresFix, Parameters
from tests.test_control import stand_ins  # noqa: F401 (a fixture: stand-ins for what other branches add)


@pytest.mark.parametrize("fields, words", [
    (dict(width=60), "width and height must be positive multiples of 8, got 60xNone"),
    (dict(steps=0), "steps must be between 1 and 1000, got 0"),
    (dict(batch_size=0), "batch size and batch count must be at least 1"),
    (dict(guidance_until=0.0), "guidance_until (the fraction of the steps with guidance) must be in (0, 1]"),
    (dict(strength=1.5), "strength (denoising strength) must be between 0 and 1, got 1.5"),
    (dict(seed=MAX_SEED + 1), f"seed must be at most {MAX_SEED}"),
    (dict(clip_skip=-1), "clip skip must be a whole number, 1 (the last CLIP layer) or more, got -1"),
    (dict(mask_blur=-2), "mask blur must be at least 0, got -2"),
    (dict(sampler="Nope"), "unknown sampler 'Nope'"),
    (dict(sampler="Euler Beta"), "unknown schedule 'beta'"),  # a schedule named in the sampler is checked too
    (dict(schedule="wobbly"), "unknown schedule 'wobbly'"),
    (dict(resize_mode="stretch"), "unknown resize mode 'stretch'"),
    (dict(mask=Image.new("L", (8, 8))), "a mask needs an init image"),
    (dict(token_merging=1.0), "the token merging ratio must be at least 0 and below 1"),
    (dict(hires=HiresFix(scale=9)), "the hires scale must be between 1 and 8, got 9"),
    (dict(hires=HiresFix(sampler="Euler", schedule="wobbly")), "hires sampler: unknown schedule 'wobbly'"),
    (dict(hires=HiresFix(), init_image=Image.new("RGB", (8, 8))), "hires fix is for txt2img"),
    (dict(prompt="a cat <hypernet:anime:0.5>"), "the prompt asks for a hypernetwork (<hypernet:anime:0.5>)"),
    (dict(negative_prompt="<hypernet:x>"), "the negative prompt asks for a hypernetwork"),
    (dict(hires=HiresFix(prompt="<hypernet:x:1>")), "the hires prompt asks for a hypernetwork"),
])
def test_each_rule_is_one_sentence(fields, words):
    with pytest.raises(ValueError) as e:
        GenerationRequest(**{"prompt": "x", **fields}).check()
    assert words in str(e.value) and "\n" not in str(e.value)


def test_wrong_kinds_of_values_are_type_errors():
    with pytest.raises(TypeError, match="prompt and negative_prompt must be strings"):
        GenerationRequest(3).check()
    with pytest.raises(TypeError, match="init_image must be a PIL image"):
        GenerationRequest("x", init_image="cat.png").check()


def test_token_merging_needs_the_eager_unet():
    GenerationRequest("x", token_merging=0.5).check(backend="eager")
    with pytest.raises(ValueError, match="token merging needs the eager UNet"):
        GenerationRequest("x", token_merging=0.5).check(backend="openvino")
    with pytest.raises(ValueError, match="token merging needs the eager UNet"):  # the second pass's own ratio too
        GenerationRequest("x", hires=HiresFix(token_merging=0.5)).check(backend="openvino")


def test_defaults_and_what_none_zero_and_negative_mean():
    GenerationRequest("x", width=0, height=None, clip_skip=0, seed=-7).check()  # the model's size and clip skip
    assert all(0 <= GenerationRequest("x", seed=s).first_seed() <= MAX_SEED for s in (-1, -7, None))
    assert GenerationRequest("x", seed=5).first_seed() == 5
    # a run never goes past the largest seed: it starts lower
    assert GenerationRequest("x", seed=MAX_SEED, batch_size=2, batch_count=2).first_seed() + 3 <= MAX_SEED


@pytest.mark.parametrize("first, schedule, hires, expected", [
    ("DPM++ 2M Karras", None, HiresFix(sampler="Euler"), ("Euler", "karras")),  # the schedule in the name goes on
    ("DPM++ 2M", "exponential", HiresFix(sampler="Euler"), ("Euler", "exponential")),  # so does one given on its own
    ("Euler a", "automatic", HiresFix(sampler="DPM++ 2M"), ("DPM++ 2M", "karras")),  # automatic: the sampler's own
    ("Euler a", None, HiresFix(), ("Euler a", "normal")),
    ("DPM++ 2M", "karras", HiresFix(schedule="simple"), ("DPM++ 2M", "simple")),
])
def test_the_hires_fix_takes_the_first_pass_sampler_and_schedule_as_a1111_does(first, schedule, hires, expected):
    info, chosen = hires.resolve(first, schedule)
    assert (info.name, chosen) == expected


def test_parameters_write_a1111s_infotext():
    p = Parameters(prompt="a cat", negative_prompt="blurry", steps=20, sampler="DPM++ 2M", schedule="karras",
                   cfg_scale=7, guidance_until=0.6, seed=5, width=512, height=512, batch_size=1, batch_count=1,
                   clip_skip=2, denoising_strength=0.7, model="m", model_hash="abc", deepcache=FAST.deepcache_interval,
                   hires=HiresFix(scale=1.5, sampler="Euler"), hires_sampler="Euler", hires_schedule="karras")
    f = parse_infotext(p.infotext(seed=6))
    assert (f["Prompt"], f["Negative prompt"], f["Seed"], f["Schedule type"], f["CFG scale"]) == \
        ("a cat", "blurry", "6", "Karras", "7")
    assert (f["Clip skip"], f["Guidance until"], f["DeepCache interval"], f["Hires upscale"], f["Hires sampler"]) == \
        ("2", "0.6", "2", "1.5", "Euler")
    assert "Hires schedule type" not in f and "Token merging ratio" not in f  # the same as the first pass's / off


@pytest.mark.parametrize("fields, words", [
    (dict(subseed=MAX_SEED + 1), f"subseed (the variation seed) must be at most {MAX_SEED} (-1: random)"),
    (dict(subseed_strength=-0.1), "subseed_strength (the variation strength) must be between 0 and 1, got -0.1"),
    (dict(seed_resize_from_w=64, seed_resize_from_h=-1), "seed_resize_from_w and seed_resize_from_h must both be"),
    (dict(seed_resize_from_w=60, seed_resize_from_h=64), "multiples of 8 (or both 0 or -1: off), got 60x64"),
    (dict(eta_noise_seed_delta=-1), "eta_noise_seed_delta (ENSD) must be between 0 and"),
    (dict(sampler="Euler", s_churn=-1), "s_churn must be a number of at least 0, got -1"),
    (dict(sampler="DPM++ 2M", s_noise=0.9), "s_noise is for the samplers DPM++ SDE, DPM++ 2M SDE, DPM++ 2M SDE Heun"),
    (dict(sampler="PLMS", eta=0.0), "eta is for the samplers"),  # eta given to a sampler without one: refused
    (dict(sampler="Euler", s_churn=1, hires=HiresFix(sampler="DPM++ 2M")), None),  # one of the passes takes it
    (dict(sampler="DPM++ 2M", s_tmax=2, hires=HiresFix(sampler="LMS")), "DPM++ 2M and LMS do not take it"),
])
def test_variation_seeds_tiling_and_sampler_settings_rules(fields, words):
    request = GenerationRequest(**{"prompt": "x", **fields})
    if words is None:
        request.check()
        return
    with pytest.raises(ValueError) as e:
        request.check()
    assert words in str(e.value) and "\n" not in str(e.value)


def test_sampler_options_and_their_infotext_fields():
    from plainsd.diffusion.samplers import SAMPLERS
    from plainsd.request import sampler_fields

    euler, ancestral, ddim, fast = (SAMPLERS[n] for n in ("Euler", "Euler a", "DDIM", "DPM fast"))
    request = GenerationRequest("x", s_churn=2, s_tmax=0, s_noise=1.0)
    assert request.sampler_options(euler) == {"s_churn": 2.0, "s_tmax": float("inf"), "s_noise": 1.0}
    assert sampler_fields(request.sampler_options(euler), euler) == {"Sigma churn": 2.0}  # defaults left out
    assert request.sampler_options(ancestral) == {"eta": 1.0, "s_noise": 1.0}  # A1111's eta_ancestral default
    assert GenerationRequest("x").sampler_options(ddim) == {"eta": 0.0}  # ... and eta_ddim's
    assert GenerationRequest("x").sampler_options(fast)["eta"] == 1.0  # A1111 gives DPM fast eta_ancestral too
    assert sampler_fields({"eta": 0.3}, ddim) == {"Eta DDIM": 0.3}
    assert sampler_fields({"eta": 0.3, "s_tmin": 0.5}, ancestral) == {"Eta": 0.3, "Sigma tmin": 0.5}
    assert 0 <= GenerationRequest("x", subseed=-1).first_subseed() <= MAX_SEED


def test_parameters_write_variation_seed_resize_and_tiling():
    p = Parameters(prompt="a cat", negative_prompt="", steps=20, sampler="Euler", schedule="normal", cfg_scale=7,
                   guidance_until=1.0, seed=5, width=512, height=512, batch_size=1, batch_count=1, clip_skip=1,
                   denoising_strength=None, model="m", model_hash="abc", subseed=9, subseed_strength=0.25,
                   seed_resize_from=(448, 512), tiling=True, eta_noise_seed_delta=31337,
                   sampler_fields={"Sigma churn": 1.5})
    text = p.infotext(seed=5, subseed=10)
    assert ("Seed: 5, Size: 512x512, Model hash: abc, Model: m, Variation seed: 10, Variation seed strength: 0.25, "
            "Seed resize from: 448x512, ENSD: 31337") in text  # in A1111's order
    f = parse_infotext(text)
    assert (f["Tiling"], f["Sigma churn"]) == ("True", "1.5")
    plain = parse_infotext(Parameters(**{**p.__dict__, "subseed_strength": 0.0, "seed_resize_from": None,
                                         "tiling": False}).infotext(5))
    assert not {"Variation seed", "Variation seed strength", "Seed resize from", "Tiling"} & set(plain)


_HINT = Image.new("RGB", (8, 8))


@pytest.mark.parametrize("unit, words", [
    (dict(control_mode="strong"), "unknown control mode 'strong'; known: Balanced, My prompt is more important, "
                                  "ControlNet is more important (A1111's 0 to 2)"),
    (dict(control_mode=3), "unknown control mode 3"),
    (dict(resize_mode="Stretch"), "unknown ControlNet resize mode 'Stretch'"),
    (dict(weight=2.5), "a ControlNet unit's weight must be between 0 and 2, got 2.5"),
    (dict(guidance_start=0.5, guidance_end=0.5), "guidance start and end must satisfy 0 <= start < end <= 1"),
    (dict(guidance_end=1.2), "guidance start and end must satisfy 0 <= start < end <= 1"),
    (dict(processor_res=32), "processor_res (the preprocessor's resolution) must be a whole number from 64 to 2048"),
    (dict(module="sharpen"), "unknown ControlNet preprocessor 'sharpen'"),
    (dict(model="nope"), "no ControlNet named 'nope'"),
    (dict(image=None), "needs an image (only img2img and inpainting may leave it out"),
])
def test_each_controlnet_rule_is_one_sentence(unit, words, stand_ins):
    from plainsd.request import ControlUnit
    fields = {"model": __file__, "image": _HINT, **unit}
    with pytest.raises(ValueError) as e:
        GenerationRequest("x", controlnet=(ControlUnit(**fields),)).check()
    assert words in str(e.value) and "\n" not in str(e.value)


def test_controlnet_numbers_and_the_init_image(stand_ins):
    from plainsd.request import ControlUnit
    unit = ControlUnit(__file__, _HINT, control_mode=2, resize_mode=0)  # the extension's numbers
    GenerationRequest("x", controlnet=(unit,)).check()
    assert unit.mode == "ControlNet is more important" and unit.resize == "Just Resize"
    GenerationRequest("x", init_image=_HINT, controlnet=(ControlUnit(__file__),)).check()  # img2img: the init image
    with pytest.raises(TypeError, match="controlnet must be a tuple of ControlUnit"):
        GenerationRequest("x", controlnet=unit).check()
