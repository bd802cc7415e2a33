"""txt2img / img2img / inpaint on tiny random models: seeds, sizes, strength, masks, callbacks, every sampler."""

import numpy as np
import pytest
import torch
from PIL import Image

import plainsd
from plainsd import pipeline
from plainsd.diffusion.samplers import SAMPLERS
from plainsd.pnginfo import parse_infotext
from plainsd.runtime import Engine


@pytest.fixture(scope="module")
def sd():
    return plainsd.build("tiny", seed=0)


def _arr(image):
    return np.asarray(image, dtype=np.int16)


def test_seeds_batches_and_reproducibility(sd):
    r = pipeline.txt2img(sd, "a red circle", steps=4, seed=10, batch_size=2, batch_count=2)
    assert r.seeds == [10, 11, 12, 13] and len(r.images) == 4 and r.images[0].size == (64, 64)
    alone = pipeline.txt2img(sd, "a red circle", steps=4, seed=12)
    # The same picture whether alone or in a batch, up to float rounding: batched matrix products may sum in
    # another order, which can move a pixel by one level (seen on CI); a different seed would move thousands.
    assert np.abs(_arr(alone.images[0]) - _arr(r.images[2])).max() <= 1
    again = pipeline.txt2img(sd, "a red circle", steps=4, seed=10, batch_size=2, batch_count=2)
    assert all(np.array_equal(_arr(a), _arr(b)) for a, b in zip(r.images, again.images))
    assert not np.array_equal(_arr(r.images[0]), _arr(r.images[1]))
    rnd = pipeline.txt2img(sd, "x", steps=2, seed=-1)
    assert 0 <= rnd.seeds[0] < 2**32 and parse_infotext(rnd.infotexts[0])["Seed"] == str(rnd.seeds[0])


def test_sizes_and_bad_values(sd):
    r = pipeline.txt2img(sd, "x", steps=2, seed=1, width=72, height=40)
    assert r.images[0].size == (72, 40)
    with pytest.raises(ValueError, match="multiples of 8, got 60x64"):
        pipeline.txt2img(sd, "x", steps=2, width=60, height=64)
    with pytest.raises(ValueError, match="steps must be between 1 and 1000"):
        pipeline.txt2img(sd, "x", steps=0)
    with pytest.raises(ValueError, match="unknown sampler"):
        pipeline.txt2img(sd, "x", sampler="nope")
    with pytest.raises(ValueError, match="unknown schedule"):
        pipeline.txt2img(sd, "x", schedule="nope")
    with pytest.raises(ValueError, match="strength"):
        pipeline.img2img(sd, Image.new("RGB", (64, 64)), "x", strength=1.5)
    with pytest.raises(ValueError, match="seed must be"):
        pipeline.txt2img(sd, "x", seed=2**40)


def test_infotext_fields(sd):
    r = pipeline.txt2img(sd, "a (red:1.2) circle", "blurry", steps=3, seed=5, sampler="Euler a", cfg_scale=5.5, clip_skip=2)
    f = parse_infotext(r.infotexts[0])
    assert f["Prompt"] == "a (red:1.2) circle" and f["Negative prompt"] == "blurry"
    assert (f["Steps"], f["Sampler"], f["Schedule type"], f["CFG scale"], f["Seed"]) == ("3", "Euler a", "Normal", "5.5", "5")
    assert f["Size"] == "64x64" and f["Model"] == "tiny" and f["Clip skip"] == "2"


def test_token_merging(sd):
    plain = pipeline.txt2img(sd, "a red circle", steps=4, seed=2, sampler="Euler")
    merged = pipeline.txt2img(sd, "a red circle", steps=4, seed=2, sampler="Euler", token_merging=0.5)
    assert parse_infotext(merged.infotexts[0])["Token merging ratio"] == "0.5"
    assert "Token merging ratio" not in parse_infotext(plain.infotexts[0])
    assert not np.array_equal(_arr(plain.images[0]), _arr(merged.images[0]))
    again = pipeline.txt2img(sd, "a red circle", steps=4, seed=2, sampler="Euler")  # for that run only
    assert np.array_equal(_arr(plain.images[0]), _arr(again.images[0]))
    assert {m.merge_ratio for m in sd.unet.modules() if hasattr(m, "merge_ratio")} == {0.0}
    both = pipeline.txt2img(sd, "a red circle", steps=4, seed=2, sampler="Euler", token_merging=0.5, fast=True)
    fields = parse_infotext(both.infotexts[0])  # with fast mode's DeepCache, whose cheap calls merge too
    assert fields["Token merging ratio"] == "0.5" and fields["DeepCache interval"] == "2"
    fast_only = pipeline.txt2img(sd, "a red circle", steps=4, seed=2, sampler="Euler", fast=True)
    assert not np.array_equal(_arr(both.images[0]), _arr(fast_only.images[0]))
    with pytest.raises(ValueError, match="token merging ratio must be at least 0 and below 1"):
        pipeline.txt2img(sd, "x", steps=2, token_merging=1.0)
    compiled = Engine(sd, "openvino", unet=lambda *args: None)  # as runtime.prepare(sd, "openvino") makes it
    with pytest.raises(ValueError, match="token merging needs the eager UNet"):
        pipeline.txt2img(compiled, "x", steps=2, token_merging=0.5)


def test_hires_fix_is_txt2img_then_img2img_of_its_upscaled_image(sd):
    # With an image upscaler the second pass is img2img of the first pass's picture resized by Lanczos (to a level):
    # the same seed's noise at the larger size. As in A1111 the second pass runs all of its 6 steps, at the end of a
    # schedule stretched to 6 / 0.5 = 12 steps: img2img's last t_enc + 1 = int(12 * 0.45) + 1 = 6 of 12 steps.
    hires = pipeline.HiresFix(scale=1.5, upscaler="Lanczos", steps=6, strength=0.5)
    seen = []
    r = pipeline.txt2img(sd, "a red circle", steps=4, seed=3, sampler="Euler", hires=hires,
                         callback=lambda s: seen.append((s.step, s.total)))
    first = pipeline.txt2img(sd, "a red circle", steps=4, seed=3, sampler="Euler")
    again = pipeline.img2img(sd, first.images[0].resize((96, 96), Image.LANCZOS), "a red circle", steps=12, seed=3,
                             sampler="Euler", strength=0.45)
    assert r.images[0].size == (96, 96)
    assert np.abs(_arr(r.images[0]) - _arr(again.images[0])).max() <= 1
    assert seen == [(i, 10) for i in range(10)]  # 4 steps, then 6 (the callback counts on through both passes)
    f = parse_infotext(r.infotexts[0])
    assert (f["Size"], f["Hires upscale"], f["Hires upscaler"], f["Hires steps"], f["Denoising strength"]) == \
        ("64x64", "1.5", "Lanczos", "6", "0.5")


def test_hires_fix_token_merging_of_its_own(sd):
    # A1111's token_merging_ratio_hr: the second pass merges tokens as img2img with that ratio would
    lanczos = dict(scale=1.5, upscaler="Lanczos", steps=6, strength=0.5)
    r = pipeline.txt2img(sd, "a red circle", steps=4, seed=3, sampler="Euler",
                         hires=pipeline.HiresFix(**lanczos, token_merging=0.5))
    first = pipeline.txt2img(sd, "a red circle", steps=4, seed=3, sampler="Euler")
    again = pipeline.img2img(sd, first.images[0].resize((96, 96), Image.LANCZOS), "a red circle", steps=12, seed=3,
                             sampler="Euler", strength=0.45, token_merging=0.5)
    assert np.abs(_arr(r.images[0]) - _arr(again.images[0])).max() <= 1
    unmerged = pipeline.txt2img(sd, "a red circle", steps=4, seed=3, sampler="Euler", hires=pipeline.HiresFix(**lanczos))
    assert not np.array_equal(_arr(r.images[0]), _arr(unmerged.images[0]))
    f = parse_infotext(r.infotexts[0])
    assert f["Token merging ratio hr"] == "0.5" and "Token merging ratio" not in f
    assert {m.merge_ratio for m in sd.unet.modules() if hasattr(m, "merge_ratio")} == {0.0}
    # without its own ratio the second pass keeps the first pass's, and A1111 writes that one for it too
    both = pipeline.txt2img(sd, "a red circle", steps=2, seed=3, sampler="Euler", token_merging=0.3,
                            hires=pipeline.HiresFix(**lanczos))
    f = parse_infotext(both.infotexts[0])
    assert (f["Token merging ratio"], f["Token merging ratio hr"]) == ("0.3", "0.3")
    with pytest.raises(ValueError, match="hires token merging ratio must be at least 0 and below 1"):
        pipeline.txt2img(sd, "x", steps=2, hires=pipeline.HiresFix(token_merging=1.0))
    compiled = Engine(sd, "openvino", unet=lambda *args: None)  # refused before the first pass
    with pytest.raises(ValueError, match="token merging needs the eager UNet"):
        pipeline.txt2img(compiled, "x", steps=2, hires=pipeline.HiresFix(token_merging=0.5))


def test_hires_fix_latent_upscale_and_sizes(sd):
    # Strength 0: the picture is the decoded first-pass latents, interpolated (A1111's "Latent" = bilinear).
    last = []
    r = pipeline.txt2img(sd, "x", steps=3, seed=4, sampler="Euler", hires=pipeline.HiresFix(strength=0.0),
                         callback=lambda s: last.append(s.denoised))
    up = torch.nn.functional.interpolate(last[-1], size=(16, 16), mode="bilinear")
    assert r.images[0].size == (128, 128)
    assert np.abs(_arr(r.images[0]) - _arr(pipeline.decode(sd, up)[0])).max() <= 1
    nearest = pipeline.txt2img(sd, "x", steps=3, seed=4, sampler="Euler",
                               hires=pipeline.HiresFix(strength=0.0, upscaler="Latent (nearest)"))
    blocky = pipeline.decode(sd, torch.nn.functional.interpolate(last[-1], size=(16, 16), mode="nearest"))[0]
    assert np.abs(_arr(nearest.images[0]) - _arr(blocky)).max() <= 1
    # A1111's sizes: one side given keeps the aspect ratio; both crop the upscaled first pass to fill them
    assert pipeline.HiresFix(width=1024).target(512, 768) == (1024, 1536, 0, 0)
    assert pipeline.HiresFix(width=1024, height=1024).target(512, 768) == (1024, 1536, 0, 64)
    assert pipeline.HiresFix(width=1024, height=512).final_size(512, 512) == (1024, 512)
    assert pipeline.HiresFix(scale=1.3).final_size(520, 512) == (672, 664)  # int(676) -> whole latents
    wide = pipeline.txt2img(sd, "x", steps=2, seed=1, width=64, height=48,
                            hires=pipeline.HiresFix(width=96, height=96, strength=0.5))
    assert wide.images[0].size == (96, 96) and "Hires resize: 96x96" in wide.infotexts[0]


def test_hires_fix_second_pass_settings_and_bad_values(sd):
    plain = pipeline.txt2img(sd, "x", steps=3, seed=5, hires=pipeline.HiresFix(strength=0.6))
    other = pipeline.txt2img(sd, "x", steps=3, seed=5,
                             hires=pipeline.HiresFix(strength=0.6, prompt="a blue square", sampler="Euler a"))
    f = parse_infotext(other.infotexts[0])
    assert (f["Hires prompt"], f["Hires sampler"]) == ("a blue square", "Euler a")
    assert "Hires prompt" not in plain.infotexts[0]
    assert not np.array_equal(_arr(plain.images[0]), _arr(other.images[0]))
    stop = pipeline.txt2img(sd, "x", steps=3, seed=5, hires=pipeline.HiresFix(), interrupt=lambda: True)
    assert stop.interrupted and stop.images[0].size == (64, 64)  # stopped in the first pass: no second
    for hires, words in [(pipeline.HiresFix(upscaler="R-ESRGAN 4x+"), "unknown hires upscaler 'R-ESRGAN 4x+'"),
                         (pipeline.HiresFix(scale=0.5), "hires scale must be between 1 and 8"),
                         (pipeline.HiresFix(width=100), "multiples of 8"),
                         (pipeline.HiresFix(strength=2), "hires denoising strength must be between 0 and 1")]:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("+", r"\+")):
            pipeline.txt2img(sd, "x", steps=2, hires=hires)
    for prompt, hires_prompt, words in [("x <lora:a:1>", "y", r"\(none\) differ from the prompt's \(<lora:a:1>\)"),
                                        ("x", "y <lora:a:0.5>", r"\(<lora:a:0.5>\) differ from the prompt's \(none\)")]:
        with pytest.raises(ValueError, match="the hires prompt's LoRA tags " + words):
            pipeline.txt2img(sd, prompt, steps=2, hires=pipeline.HiresFix(prompt=hires_prompt))
    pipeline.GenerationRequest("x <lora:a:1>", hires=pipeline.HiresFix(prompt="y <lora:a:1>")).check()  # the same
    with pytest.raises(ValueError, match="hires fix is for txt2img"):
        pipeline.generate(sd, pipeline.GenerationRequest("x", steps=2, init_image=Image.new("RGB", (64, 64)),
                                                         hires=pipeline.HiresFix()))


def test_guidance_and_negative_prompt(sd):
    a = pipeline.txt2img(sd, "x", "one thing", steps=3, seed=1, cfg_scale=1.0)
    b = pipeline.txt2img(sd, "x", "another thing", steps=3, seed=1, cfg_scale=1.0)
    assert np.array_equal(_arr(a.images[0]), _arr(b.images[0]))  # scale 1: the negative prompt is not used
    c = pipeline.txt2img(sd, "x", "another thing", steps=3, seed=1, cfg_scale=7.0)
    assert not np.array_equal(_arr(a.images[0]), _arr(c.images[0]))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_runs(sd, name):
    r = pipeline.txt2img(sd, "x", steps=3, seed=2, sampler=name)
    assert r.images[0].size == (64, 64) and parse_infotext(r.infotexts[0])["Sampler"] == name


def test_callback_interrupt_and_steps(sd):
    seen = []
    r = pipeline.txt2img(sd, "x", steps=5, seed=1, sampler="Euler", callback=lambda s: seen.append((s.step, s.total)))
    assert seen == [(i, 5) for i in range(5)] and not r.interrupted
    stop = pipeline.txt2img(sd, "x", steps=5, seed=1, batch_count=3, sampler="Euler", interrupt=lambda: True)
    assert stop.interrupted and len(stop.images) == 1
    frames = pipeline.txt2img(sd, "x", steps=4, seed=1, record_steps=True, batch_size=2).frames
    assert len(frames) == 2 and len(frames[0]) == 5


def test_img2img_strength(sd):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    calls = []
    pipeline.img2img(sd, init, "x", strength=0.0, steps=10, seed=1, callback=lambda s: calls.append(s.sigma))
    sigmas = pipeline._denoiser(sd).get_sigmas(10, "karras")  # (DPM++ 2M's automatic schedule)
    assert calls == [pytest.approx(float(sigmas[-2]))]  # strength 0: A1111's one last step, at the smallest noise
    calls = []
    pipeline.img2img(sd, init, "x", strength=0.5, steps=10, seed=1, sampler="Euler", callback=lambda s: calls.append(s))
    assert len(calls) == 6  # A1111's int(10 * 0.5) + 1 steps
    big = pipeline.img2img(sd, init.resize((128, 96)), "x", steps=2, seed=1, width=64, height=64, resize_mode="crop and resize")
    assert big.images[0].size == (64, 64) and "Denoising strength: 0.8" in big.infotexts[0]


@pytest.mark.parametrize("preset", ["tiny", "tiny-inpaint"])
def test_inpaint_keeps_the_unmasked_part(preset):
    model = plainsd.build(preset, seed=1)
    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # repaint the left half
    r = pipeline.inpaint(model, init, mask, "x", steps=4, seed=1, mask_blur=0, strength=1.0)
    out, src = _arr(r.images[0]), _arr(init)
    assert np.array_equal(out[:, 32:], src[:, 32:])
    assert not np.array_equal(out[:, :32], src[:, :32])
    inverted = pipeline.inpaint(model, init, mask, "x", steps=2, seed=1, mask_blur=0, inpainting_mask_invert=True)
    assert np.array_equal(_arr(inverted.images[0])[:, :32], src[:, :32])


def test_other_model_kinds_run():
    for preset in ("tiny-sd2", "tiny-v", "tiny-inpaint"):
        r = pipeline.txt2img(plainsd.build(preset), "a (red) circle BREAK left", steps=2, seed=1)
        assert r.images[0].size == (64, 64)
    with pytest.raises(ValueError, match="LoRA"):
        pipeline.txt2img(plainsd.build("tiny"), "a <lora:x:1> circle", steps=1)


def test_the_models_own_defaults_are_used(tmp_path):
    model = plainsd.build("tiny")
    model.defaults = {"steps": 3, "sampler": "Euler", "cfg_scale": 4.0, "width": 48, "height": 40}
    plainsd.save(model, tmp_path / "m.safetensors")
    loaded = plainsd.load(tmp_path / "m.safetensors")
    assert loaded.defaults == model.defaults
    f = parse_infotext(pipeline.txt2img(loaded, "x", seed=1).infotexts[0])
    assert (f["Steps"], f["Sampler"], f["CFG scale"], f["Size"]) == ("3", "Euler", "4", "48x40")
    f = parse_infotext(pipeline.txt2img(loaded, "x", seed=1, steps=2, cfg_scale=6).infotexts[0])
    assert (f["Steps"], f["CFG scale"]) == ("2", "6")
    assert "Guidance until" not in f  # guidance on every step: nothing to record


def test_guidance_until_is_a_setting_with_a_model_default(tmp_path):
    """Guidance for the first part of the steps only: the guided run equals a hand-made mix of the two."""
    from plainsd.fast import FastSettings

    model = plainsd.build("tiny")
    model.defaults = {"guidance_until": 0.5}
    plainsd.save(model, tmp_path / "m.safetensors")
    loaded = plainsd.load(tmp_path / "m.safetensors")
    assert loaded.defaults == {"guidance_until": 0.5}
    kw = dict(steps=6, sampler="DPM++ 2M", cfg_scale=5, seed=3)
    r = pipeline.txt2img(loaded, "a red circle", **kw)
    assert parse_infotext(r.infotexts[0])["Guidance until"] == "0.5" and r.parameters.guidance_until == 0.5
    # the same as fast mode's cut-off with nothing else of fast mode on (tested step by step in test_fast)
    cut = FastSettings(deepcache_interval=1, guidance_until=0.5, tiny_decoder=False)
    same = pipeline.txt2img(loaded, "a red circle", guidance_until=1.0, fast=cut, **kw)
    assert np.array_equal(_arr(r.images[0]), _arr(same.images[0]))
    full = pipeline.txt2img(loaded, "a red circle", guidance_until=1.0, **kw)  # the caller's value wins
    assert not np.array_equal(_arr(r.images[0]), _arr(full.images[0]))
    with pytest.raises(ValueError, match=r"guidance_until .* must be in \(0, 1\], got 1.5"):
        pipeline.txt2img(loaded, "x", guidance_until=1.5, steps=2)


def test_img2img_latent_upscale_resizes_the_latents(monkeypatch, sd):
    # A1111's resize mode 3: the init image encoded at its own size (whole latents), its latents resized bilinearly
    init = Image.fromarray(np.random.default_rng(2).integers(0, 255, (44, 36, 3), dtype=np.uint8))
    started = []
    monkeypatch.setattr(pipeline, "_sample", lambda model, p, x, start, *args: (started.append(start), (start, True))[1])
    pipeline.img2img(sd, init, "x", steps=2, seed=1, width=64, height=48, resize_mode=3)
    with torch.no_grad():
        own = sd.vae.encode(plainsd.images.to_tensor(init.resize((32, 40)))).mode() * sd.config.scale_factor
    assert torch.equal(started[0], torch.nn.functional.interpolate(own, size=(6, 8), mode="bilinear"))
    with pytest.raises(ValueError, match="latent upscale. is for img2img without a mask"):
        pipeline.inpaint(sd, init, Image.new("L", (36, 44), 255), "x", steps=2, resize_mode=3)
