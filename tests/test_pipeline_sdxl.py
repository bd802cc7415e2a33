"""Generation with SDXL models: the whole txt2img run against diffusers' StableDiffusionXLPipeline on the same random
weights (same noise, Euler on the same sigmas), the conditioning each pass gives the UNet (A1111's defaults: the
picture's size as original and target size, crop 0, 0; an empty negative prompt as zeros), infotext, refusals;
ControlNet units against diffusers' StableDiffusionXLControlNetPipeline, Control-LoRAs, T2I-Adapter units against
StableDiffusionXLAdapterPipeline; the refiner."""

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import plainsd
from plainsd import pipeline, runtime
from plainsd.diffusion.samplers import SAMPLERS
from plainsd.models.sdxl import size_numbers, vector
from plainsd.models.tokenizer import Tokenizer
from plainsd.pnginfo import parse_infotext
from plainsd.prompts import tokenize_chunks
from plainsd.request import ControlUnit, GenerationRequest
from plainsd.runtime import Engine
from tests.reference import max_diff, perturb, sdxl_text_reference


class Spy:
    """Wraps a UNet and records what each call gets: (context, y)."""

    def __init__(self, unet):
        self.unet, self.calls = unet, []

    def __call__(self, x, t, context, **kw):
        self.calls.append((context, kw.get("y")))
        return self.unet(x, t, context, **kw)


def _run(sd, **kw):
    spy = Spy(sd.unet)
    result = pipeline.generate(Engine(sd, unet=spy), GenerationRequest(**{"prompt": "a red circle", "seed": 3, **kw}))
    return result, spy.calls


def _diffusers_picture(pipe_class, reference, prompt, negative, steps, seed, scale, parts, **call):
    """What one of diffusers' SDXL pipelines draws at 64x64 (0-255) on sdxl_reference's networks: from the text
    states transformers' towers give for the same token ids (its encode_prompt's recipe), the image's noise of
    `seed`, Euler on plainsd's sigmas (diffusers takes them as custom sigmas), its own time ids and, for an empty
    negative prompt, its own zeros (force_zeros_for_empty_prompt). parts: the pipeline's other arguments (a
    ControlNet, ...); call: its call's (a hint, a conditioning scale, ...)."""
    from diffusers import EulerDiscreteScheduler

    _, unet, vae, text, text2, sd = reference
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="linspace")  # (so that init_noise_sigma is sigma_max)
    pipe = pipe_class(vae=vae, text_encoder=text, text_encoder_2=text2, tokenizer=None, tokenizer_2=None, unet=unet,
                      scheduler=scheduler, force_zeros_for_empty_prompt=True, **parts)
    pipe.set_progress_bar_config(disable=True)
    sigmas = pipeline._denoiser(sd, sampler=SAMPLERS["Euler"]).get_sigmas(steps, "normal")
    embeds = {}
    with torch.no_grad():
        embeds["prompt_embeds"], embeds["pooled_prompt_embeds"] = sdxl_text_reference(
            text, text2, Tokenizer("sd1")([prompt]), Tokenizer("sd2")([prompt]))
        if negative:
            embeds["negative_prompt_embeds"], embeds["negative_pooled_prompt_embeds"] = sdxl_text_reference(
                text, text2, Tokenizer("sd1")([negative]), Tokenizer("sd2")([negative]))
        noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))  # the image's noise
        theirs = pipe(**embeds, sigmas=sigmas.tolist(), guidance_scale=scale, height=64, width=64, latents=noise,
                      output_type="np", **call).images[0]
    return theirs * 255


@pytest.fixture(scope="module")
def sd():
    return perturb(plainsd.build("tiny-sdxl", seed=0), 0)


@pytest.mark.parametrize("negative", ["", "blurry, dark"])
def test_whole_run_matches_diffusers_sdxl_pipeline(sdxl_reference, record_parity, negative):
    """Ours from the prompt's text, against StableDiffusionXLPipeline as _diffusers_picture runs it."""
    from diffusers import StableDiffusionXLPipeline

    reference = sdxl_reference("tiny-sdxl")
    steps, seed, scale, prompt = 6, 5, 6.0, "a red circle on the left"
    result = pipeline.txt2img(reference[-1], prompt, negative, seed=seed, steps=steps, sampler="Euler",
                              cfg_scale=scale, width=64, height=64)
    ours = np.asarray(result.images[0], dtype=np.float64)
    theirs = _diffusers_picture(StableDiffusionXLPipeline, reference, prompt, negative, steps, seed, scale,
                                {"add_watermarker": False})
    d = np.abs(ours - theirs).max()
    record_parity(f"txt2img tiny-sdxl, 6 Euler steps vs StableDiffusionXLPipeline, negative {negative!r} (0-255)", float(d))
    assert d <= 1.0, d  # (ours rounded to 8 bits)
    assert ours.std() > 5  # a picture, not a flat field


def test_conditioning_per_pass(sd):
    """Each pass's vector holds the pooled text and its own picture size (the hires pass: the final size), as A1111
    builds them; an empty negative prompt is zeros, a written one is not."""
    hires = pipeline.HiresFix(scale=1.5, upscaler="Lanczos", steps=2, strength=0.5)
    _, calls = _run(sd, steps=2, sampler="Euler", width=64, height=48, hires=hires)
    first, last = calls[0], calls[-1]
    with torch.no_grad():
        states, pooled = sd.text_encoder.encode(sd.tokenizer(["a red circle"]))
    uncond_ctx, cond_ctx = first[0].chunk(2)
    assert torch.equal(uncond_ctx, torch.zeros_like(cond_ctx)) and max_diff(cond_ctx, states) == 0
    y_uncond, y_cond = first[1].chunk(2)
    assert max_diff(y_cond, vector(pooled, torch.tensor([size_numbers("base", 64, 48)]))) == 0
    assert max_diff(y_uncond, vector(torch.zeros_like(pooled), torch.tensor([size_numbers("base", 64, 48)]))) == 0
    assert max_diff(last[1][1:], vector(pooled, torch.tensor([size_numbers("base", 96, 72)]))) == 0
    _, calls = _run(sd, steps=1, sampler="Euler", negative_prompt="blurry")
    assert calls[0][0].chunk(2)[0].abs().max() > 0.1


def test_refiner_gets_the_aesthetic_scores(sdxl_reference):
    sd = perturb(plainsd.build("tiny-sdxl-refiner", seed=0), 0)
    _, calls = _run(sd, steps=1, sampler="Euler", negative_prompt="blurry")
    with torch.no_grad():
        _, pooled = sd.text_encoder.encode(sd.tokenizer(["a red circle"]))
        _, negative = sd.text_encoder.encode(sd.tokenizer(["blurry"]))
    y_uncond, y_cond = calls[0][1].chunk(2)
    assert max_diff(y_cond, vector(pooled, torch.tensor([[64.0, 64, 0, 0, 6.0]]))) == 0
    assert max_diff(y_uncond, vector(negative, torch.tensor([[64.0, 64, 0, 0, 2.5]]))) == 0


def test_long_prompts_and_batches(sd):
    """A prompt of two chunks against a one-chunk negative prompt: the negative side is padded with the empty
    prompt's states (not zeros), as A1111 pads; the pooled text is the first chunk's. Batches give each image a row."""
    long = ", ".join(["a red circle"] * 30)
    result, calls = _run(sd, prompt=long, steps=1, sampler="Euler", batch_size=2)
    ctx, y = calls[0]
    assert ctx.shape == (4, 154, 192) and y.shape == (4, 96 + 6 * 256)
    with torch.no_grad():
        empty, _ = sd.text_encoder.encode(sd.tokenizer([""]))
        chunks = [c[0] for c in tokenize_chunks(sd.tokenizer, long)]
        _, pooled = sd.text_encoder.encode(torch.tensor(chunks))
    assert torch.equal(ctx[0, 77:], empty[0]) and not ctx[0, :77].any()
    assert max_diff(y[2, :96], pooled[0]) <= 1e-6 and max_diff(y[2, :96], pooled[1]) > 1e-2
    assert torch.equal(y[2], y[3]) and len(result.images) == 2


def test_infotext_is_a1111s(sd):
    result, _ = _run(sd, steps=2, sampler="Euler", negative_prompt="blurry", cfg_scale=5)
    fields = parse_infotext(result.infotexts[0])
    assert "Clip skip" not in fields  # as A1111 writes SDXL's (its towers' penultimate layers are the model's own)
    assert (fields["Steps"], fields["Sampler"], fields["CFG scale"], fields["Size"]) == ("2", "Euler", "5", "64x64")
    again, _ = _run(sd, steps=2, sampler="Euler", negative_prompt="blurry", cfg_scale=5, clip_skip=2)
    assert parse_infotext(again.infotexts[0])["Clip skip"] == "2"  # asked for: written (the same layers)
    assert again.images[0].tobytes() == result.images[0].tobytes()
    last, _ = _run(sd, steps=2, sampler="Euler", negative_prompt="blurry", cfg_scale=5, clip_skip=1)
    assert last.images[0].tobytes() != result.images[0].tobytes()


def test_img2img_inpaint_and_the_default_size(sd):
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    result = pipeline.img2img(sd, image, "a red circle", steps=3, seed=1, strength=0.5)
    assert result.images[0].size == (64, 48)
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (32, 0, 64, 48))
    painted = np.asarray(pipeline.inpaint(sd, image, mask, "a red circle", steps=3, seed=1, mask_blur=0).images[0])
    assert (painted[:, :32] == (200, 30, 30)).all() and np.abs(painted[:, 40:].astype(int) - (200, 30, 30)).max() > 20
    assert plainsd.build("tiny-sdxl").config.resolution == 64 and plainsd.preset("sdxl").resolution == 1024


def test_controlnet_run_matches_diffusers_sdxl_controlnet_pipeline(sdxl_reference, record_parity, tmp_path):
    """A ControlNet unit (Balanced, weight 0.8, the hint as given) against StableDiffusionXLControlNetPipeline at
    controlnet_conditioning_scale 0.8, on the same random UNet and a ControlNet diffusers made from it, written
    by its save_pretrained into the ControlNet folder; Euler on plainsd's sigmas, as the plain run's test."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    reference = sdxl_reference("tiny-sdxl")
    unet, sd = reference[1], reference[-1]
    torch.manual_seed(0)
    perturb(ControlNetModel.from_unet(unet), 4).save_pretrained(tmp_path / "xl_canny")
    controlnet = ControlNetModel.from_pretrained(tmp_path / "xl_canny").eval()
    hint = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    steps, seed, scale, prompt = 4, 5, 6.0, "a red circle on the left"
    unit = ControlUnit(model="xl_canny", image=hint, module="none", weight=0.8)
    request = GenerationRequest(prompt, seed=seed, steps=steps, sampler="Euler", cfg_scale=scale, width=64, height=64,
                                controlnet=(unit,), controlnet_dir=str(tmp_path))
    ours = np.asarray(pipeline.generate(sd, request).images[0], dtype=np.float64)
    plain = np.asarray(pipeline.generate(sd, dataclasses.replace(request, controlnet=())).images[0], dtype=np.float64)
    theirs = _diffusers_picture(StableDiffusionXLControlNetPipeline, reference, prompt, "", steps, seed, scale,
                                {"controlnet": controlnet, "add_watermarker": False}, image=hint,
                                controlnet_conditioning_scale=0.8)
    d = np.abs(ours - theirs).max()
    record_parity("txt2img tiny-sdxl + ControlNet, 4 Euler steps vs StableDiffusionXLControlNetPipeline (0-255)",
                  float(d))
    assert d <= 1.0, d
    assert np.abs(ours - plain).max() > 10  # the ControlNet steers the picture
    # an AVX2 CPU's default: fp16 weights computed in float32, the ControlNet's as the UNet's, read in fp16
    engine = runtime.prepare(copy.deepcopy(sd).half())
    stored = np.asarray(pipeline.generate(engine, request).images[0], dtype=np.float64)
    (net,) = engine.controlnets.values()
    assert runtime.half_stored(net) and net.label_emb[0][0].weight.dtype == torch.float16
    d16 = np.abs(stored - ours).max()
    record_parity("txt2img tiny-sdxl + ControlNet, fp16 weights computed in float32 vs float32 (0-255)", float(d16))
    assert d16 <= 2, d16


def test_a_control_lora_unit_runs_as_the_controlnet_it_builds(sd, tmp_path):
    """A Control-LoRA in the ControlNet folder: built on the engine's UNet (with the run's LoRAs merged in, again
    when they change), it draws what the ControlNet it builds draws as a plain ControlNet file, bit for bit."""
    from safetensors.torch import save_file

    from plainsd import weights
    from tests.test_lora_sdxl import kohya_file
    from tests.test_weights_controlnet import _control_lora

    save_file(_control_lora(sd.unet), str(tmp_path / "sai_xl_canny_rank2.safetensors"))
    (tmp_path / "built").mkdir()
    weights.save_controlnet(weights.load_control_lora(tmp_path / "sai_xl_canny_rank2.safetensors", sd.unet),
                            tmp_path / "built" / "as_controlnet.safetensors")
    (tmp_path / "loras").mkdir()
    kohya_file(sd, tmp_path / "loras" / "style.safetensors")
    hint = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    engine = Engine(sd)

    def draw(model, prompt="a red circle"):
        unit = ControlUnit(model, hint, module="none")
        return pipeline.txt2img(engine, prompt, steps=3, seed=1, sampler="Euler", controlnet=(unit,),
                                controlnet_dir=str(tmp_path), lora_dir=str(tmp_path / "loras")).images[0]

    lora_built = draw("sai_xl_canny_rank2")
    assert lora_built.tobytes() == draw("as_controlnet").tobytes()
    (net,) = [n for n in engine.controlnets.values() if getattr(n, "control_lora", False)]
    with_style = draw("sai_xl_canny_rank2", "<lora:style:0.8>a red circle")
    (rebuilt,) = [n for n in engine.controlnets.values() if getattr(n, "control_lora", False)]
    assert rebuilt is not net and not torch.equal(rebuilt.input_blocks[3][0].in_layers[2].weight,
                                                  net.input_blocks[3][0].in_layers[2].weight)
    assert with_style.tobytes() != lora_built.tobytes()
    assert draw("sai_xl_canny_rank2").tobytes() == lora_built.tobytes()  # (the LoRA off: built on the model's own)


def test_adapter_run_matches_diffusers_sdxl_adapter_pipeline(sdxl_reference, record_parity, tmp_path):
    """An SDXL T2I-Adapter unit (Balanced, weight 0.7) against StableDiffusionXLAdapterPipeline at
    adapter_conditioning_scale 0.7, on the same random UNet and an adapter diffusers wrote by save_pretrained;
    then at a size 8 px past a multiple of 16 (the hint padded), in fast mode, and held in fp16 beside an
    fp16-stored UNet."""
    from diffusers import StableDiffusionXLAdapterPipeline, T2IAdapter

    reference = sdxl_reference("tiny-sdxl")
    sd = reference[-1]
    torch.manual_seed(0)
    perturb(T2IAdapter(in_channels=3, channels=[32, 64, 128, 128], num_res_blocks=2, downscale_factor=16,
                       adapter_type="full_adapter_xl"), 5).save_pretrained(tmp_path / "t2i_xl_canny")
    adapter = T2IAdapter.from_pretrained(tmp_path / "t2i_xl_canny").eval()
    hint = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    steps, seed, scale, prompt = 4, 5, 6.0, "a red circle on the left"
    unit = ControlUnit(model="t2i_xl_canny", image=hint, module="none", weight=0.7)
    request = GenerationRequest(prompt, seed=seed, steps=steps, sampler="Euler", cfg_scale=scale, width=64, height=64,
                                controlnet=(unit,), controlnet_dir=str(tmp_path))
    ours = np.asarray(pipeline.generate(sd, request).images[0], dtype=np.float64)
    plain = np.asarray(pipeline.generate(sd, dataclasses.replace(request, controlnet=())).images[0], dtype=np.float64)
    theirs = _diffusers_picture(StableDiffusionXLAdapterPipeline, reference, prompt, "", steps, seed, scale,
                                {"adapter": adapter}, image=hint, adapter_conditioning_scale=0.7)
    d = np.abs(ours - theirs).max()
    record_parity("txt2img tiny-sdxl + T2I-Adapter, 4 Euler steps vs StableDiffusionXLAdapterPipeline (0-255)",
                  float(d))
    assert d <= 1.0, d
    assert np.abs(ours - plain).max() > 10  # the adapter steers the picture

    odd = dataclasses.replace(request, width=72, height=40)
    assert pipeline.generate(sd, odd).images[0].size == (72, 40)
    fast = pipeline.generate(sd, dataclasses.replace(request, fast=plainsd.fast.FAST, steps=6)).images[0]
    fast_plain = pipeline.generate(sd, dataclasses.replace(request, fast=plainsd.fast.FAST, steps=6, controlnet=()))
    assert np.abs(np.asarray(fast, dtype=np.float64) - np.asarray(fast_plain.images[0], dtype=np.float64)).max() > 10
    engine = runtime.prepare(copy.deepcopy(sd).half())
    stored = np.asarray(pipeline.generate(engine, request).images[0], dtype=np.float64)
    (net,) = engine.controlnets.values()
    assert runtime.half_stored(net) and np.abs(stored - ours).max() <= 2


def test_adapters_for_the_other_family_are_refused(sd, tmp_path):
    from plainsd.config import AdapterConfig
    from plainsd.models.t2i_adapter import T2IAdapter
    from plainsd.weights import save_adapter

    save_adapter(T2IAdapter(AdapterConfig(channels=(32, 64, 128, 128))), tmp_path / "t2iadapter_sd15.safetensors")
    save_adapter(T2IAdapter(AdapterConfig(channels=(32, 64), xl=True)), tmp_path / "t2i_xl.safetensors")
    for model, engine in (("t2iadapter_sd15", sd), ("t2i_xl", plainsd.build("tiny"))):
        unit = ControlUnit(model=model, image=Image.new("RGB", (64, 64)), module="none")
        with pytest.raises(ValueError, match="is for another kind of model.*an SDXL one an SDXL base model"):
            pipeline.txt2img(engine, "a circle", steps=1, controlnet=(unit,), controlnet_dir=str(tmp_path))


def test_an_sd1_controlnet_is_refused_by_an_sdxl_model(sd, tmp_path):
    from tests.test_control import random_controlnet, save_controlnet

    save_controlnet(random_controlnet(plainsd.build("tiny").unet.config, 0), tmp_path / "sd15_canny.safetensors")
    unit = ControlUnit(model="sd15_canny", image=Image.new("RGB", (64, 64)), module="none")
    with pytest.raises(ValueError, match="is for another kind of model.*an SDXL one an SDXL base model"):
        pipeline.txt2img(sd, "a circle", steps=1, controlnet=(unit,), controlnet_dir=str(tmp_path))


def test_what_sdxl_does_not_run_yet_is_refused(sd):
    with pytest.raises(ValueError, match="SDXL models run on the eager backend"):
        pipeline.txt2img(Engine(sd, "openvino", unet=lambda *a, **k: None), "a circle", steps=1)


# --- the refiner ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def refiner_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("refiner") / "refiner.safetensors"
    plainsd.save(perturb(plainsd.build("tiny-sdxl-refiner", seed=1), 1), path)
    return path


def _by_hand(model, prompt, negative, kind, numbers, scale, control=None):
    """A model's guided denoiser and its conditioning, built here from its parts (not the pipeline's); control: a
    ControlNet's residuals for (x, t, text states, vector), added to the UNet's."""
    from plainsd.diffusion.denoisers import DiscreteDenoiser
    from plainsd.diffusion.guidance import CFGDenoiser

    def conditioning(text, score):
        with torch.no_grad():
            states, pooled = model.text_encoder.encode(model.tokenizer([text]))
        return {"crossattn": states, "vector": vector(pooled, torch.tensor([numbers + ([score] if kind == "refiner" else [])]))}

    def unet(x, t, cond):
        residuals = control(x, t, cond["crossattn"], cond["vector"]) if control else None
        return model.unet(x, t, cond["crossattn"], y=cond["vector"], control=residuals)

    net = DiscreteDenoiser(unet)
    return CFGDenoiser(net, scale), {"cond": conditioning(prompt, 6.0), "uncond": conditioning(negative, 2.5)}


def _refined_by_hand(sd, refiner, steps, switch, scale, prompt="a red circle", control=None):
    """Euler: the base model's steps down to the first sigma whose nearest training timestep t has (999 - t) / 1000
    >= switch (A1111's completed ratio), then the refiner's, on the same latents; decoded by the refiner's VAE.
    control: a ControlNet's residuals in the base model's steps (_by_hand)."""
    from plainsd.diffusion.denoisers import DiscreteDenoiser
    from plainsd.diffusion.samplers import sample_euler
    from plainsd.images import to_pil

    table = DiscreteDenoiser(None).sigmas
    sigmas = DiscreteDenoiser(None).get_sigmas(steps, "normal")
    ratios = [(999 - int(torch.argmin((table - s).abs()))) / 1000 for s in sigmas[:-1]]
    k = next(i for i, r in enumerate(ratios) if r >= switch)
    assert 0 < k < steps
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(4)) * sigmas[0]
    with torch.no_grad():
        base_model, base_args = _by_hand(sd, prompt, "blurry", "base", [64, 64, 0, 0, 64, 64], scale, control)
        x = sample_euler(base_model, x, sigmas[:k + 1], extra_args=base_args)
        refined_model, refined_args = _by_hand(refiner, prompt, "blurry", "refiner", [64, 64, 0, 0], scale)
        x = sample_euler(refined_model, x, sigmas[k:], extra_args=refined_args)
        return to_pil(refiner.vae.decode(x / refiner.config.scale_factor))[0]


def test_refiner_takes_over_as_the_two_models_run_by_hand(sd, refiner_file):
    """The hand-over at 0.5 (A1111's completed ratio) equals the two models run by hand (_refined_by_hand)."""
    steps, switch, scale = 6, 0.5, 6.0
    result = pipeline.txt2img(sd, "a red circle", "blurry", steps=steps, seed=4, sampler="Euler", cfg_scale=scale,
                              refiner_checkpoint=str(refiner_file), refiner_switch_at=switch)
    image = _refined_by_hand(sd, plainsd.load(refiner_file), steps, switch, scale)
    d = np.abs(np.asarray(result.images[0], dtype=np.int16) - np.asarray(image, dtype=np.int16)).max()
    assert d <= 1, d
    base_only = pipeline.txt2img(sd, "a red circle", "blurry", steps=steps, seed=4, sampler="Euler", cfg_scale=scale)
    assert np.abs(np.asarray(base_only.images[0], dtype=np.int16) - np.asarray(image, dtype=np.int16)).max() > 10
    fields = parse_infotext(result.infotexts[0])
    assert (fields["Refiner"], fields["Refiner switch at"]) == ("refiner", "0.5")


def test_a_controlnet_unit_steers_the_base_models_steps_only(sd, refiner_file, tmp_path):
    """With a refiner, the ControlNet steers the base model and the refiner's steps run without it, as A1111's
    extension hooks the base model's UNet alone: the run equals the two models by hand with the ControlNet's
    residuals (Balanced, weight 1, the picture as the hint) added to the base UNet's."""
    from plainsd.models.controlnet import ControlNet
    from plainsd.weights import save_controlnet

    save_controlnet(perturb(ControlNet(sd.unet.config), 5), tmp_path / "xl_cn.safetensors")
    hint = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    steps, switch, scale = 6, 0.5, 6.0
    result = pipeline.txt2img(sd, "a red circle", "blurry", steps=steps, seed=4, sampler="Euler", cfg_scale=scale,
                              refiner_checkpoint=str(refiner_file), refiner_switch_at=switch, controlnet_dir=str(tmp_path),
                              controlnet=(ControlUnit("xl_cn", hint, module="none"),))
    cn = plainsd.weights.load_controlnet(tmp_path / "xl_cn.safetensors")
    picture = torch.from_numpy(np.asarray(hint, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    control = lambda x, t, ctx, y: cn(x, picture.expand(len(x), -1, -1, -1), t, ctx, y=y)  # noqa: E731
    image = _refined_by_hand(sd, plainsd.load(refiner_file), steps, switch, scale, control=control)
    d = np.abs(np.asarray(result.images[0], dtype=np.int16) - np.asarray(image, dtype=np.int16)).max()
    assert d <= 1, d
    plain = _refined_by_hand(sd, plainsd.load(refiner_file), steps, switch, scale)
    assert np.abs(np.asarray(plain, dtype=np.int16) - np.asarray(image, dtype=np.int16)).max() > 10


def test_tiling_with_a_refiner_wraps_both_models(sd, refiner_file, monkeypatch):
    """Tiling with a refiner: its UNet and VAE pad circularly too, so noise rolled by (4, 4) latents gives the
    picture rolled by (32, 32) px (4 latents: the tiny UNet halves twice). A prepared engine keeping one UNet in
    memory at a time: the networks written out and read back during the tiled run pad circularly as well, and are
    packed as in an untiled run."""
    from tests.test_pipeline_seeds import _rolled_noise

    engine = runtime.prepare(copy.deepcopy(sd))
    packed = {}  # tiling -> packed convolutions of the UNet each step ran

    def draw(tiling):
        def count(step):
            unet = engine.refiner[1].sd.unet if step.step >= 2 else engine.sd.unet
            packed.setdefault(tiling, []).append(sum(isinstance(m, runtime.PackedConv2d) for m in unet.modules()))

        result = pipeline.txt2img(engine, "a red circle", steps=4, seed=1, sampler="Euler", tiling=tiling,
                                  refiner_checkpoint=str(refiner_file), refiner_switch_at=0.5, callback=count)
        return np.asarray(result.images[0], dtype=np.float64)

    untiled = draw(False)
    networks = [engine.sd.unet, engine.sd.vae, engine.refiner[1].sd.unet, engine.refiner[1].sd.vae]
    tiled = draw(True)
    assert packed[True] == packed[False] and min(packed[True]) > 0  # (read back while tiled: packed all the same)
    with monkeypatch.context() as m:
        _rolled_noise(m, (4, 4))
        tiled_rolled, untiled_rolled = draw(True), draw(False)
    assert np.abs(np.roll(tiled, (32, 32), axis=(0, 1)) - tiled_rolled).mean() < 0.5
    assert np.abs(np.roll(untiled, (32, 32), axis=(0, 1)) - untiled_rolled).mean() > 5
    assert all(m.padding_mode == "zeros" for net in networks for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert np.array_equal(draw(False), untiled)


def test_fast_mode_with_a_refiner_gives_it_a_cache_of_its_own(sd, refiner_file, monkeypatch):
    """Fast mode's DeepCache with a refiner taking over at 0.5 of 8 Euler steps: the refiner's UNet runs under the
    same schedule (interval 2) with a cache of its own, so its first call runs whole (the base's cached features
    never reach it) and every other one after is cheap, also after a warm-up of the base's; without the refiner the
    pass caches as before."""
    from plainsd.fast import DeepCacheUNet, FastSettings

    calls = []
    runs_whole = DeepCacheUNet._runs_whole
    monkeypatch.setattr(DeepCacheUNet, "_runs_whole",
                        lambda self, t, batch: calls.append((self.unet, runs_whole(self, t, batch))) or calls[-1][1])
    fast = FastSettings(deepcache_interval=2, guidance_until=1.0)
    engine = Engine(sd)
    refined = pipeline.txt2img(engine, "a red circle", steps=8, seed=1, sampler="Euler", fast=fast,
                               refiner_checkpoint=str(refiner_file), refiner_switch_at=0.5).images[0]
    refiner_unet = engine.refiner[1].sd.unet
    assert [whole for unet, whole in calls if unet is sd.unet] == [True, False] * 2
    assert [whole for unet, whole in calls if unet is refiner_unet] == [True, False] * 2
    calls.clear()
    plain = pipeline.txt2img(engine, "a red circle", steps=8, seed=1, sampler="Euler", fast=fast).images[0]
    assert [whole for _, whole in calls] == [True, False] * 4 and plain.tobytes() != refined.tobytes()
    calls.clear()  # a warm-up of whole calls is the pass's start, not the refiner's again
    pipeline.txt2img(engine, "a red circle", steps=8, seed=1, sampler="Euler", refiner_checkpoint=str(refiner_file),
                     fast=dataclasses.replace(fast, deepcache_start=0.25), refiner_switch_at=0.5)
    assert [whole for unet, whole in calls if unet is sd.unet] == [True, True, False, True]
    assert [whole for unet, whole in calls if unet is refiner_unet] == [True, False] * 2


def test_refiner_switch_at_one_never_switches(sd, refiner_file):
    plain = pipeline.txt2img(sd, "a red circle", steps=3, seed=2, sampler="Euler")
    never = pipeline.txt2img(sd, "a red circle", steps=3, seed=2, sampler="Euler", refiner_checkpoint=str(refiner_file),
                             refiner_switch_at=1.0)
    assert never.images[0].tobytes() == plain.images[0].tobytes() and "Refiner" not in never.infotexts[0]


def test_refiner_with_hires_fix_runs_in_the_second_pass(sd, refiner_file):
    """A1111's default (hires_fix_refiner_pass "second pass"): the first pass is the base model's alone."""
    kw = dict(steps=3, seed=2, sampler="Euler", hires=pipeline.HiresFix(scale=1.5, upscaler="Latent", steps=3, strength=0.9))
    first = []
    refined = pipeline.txt2img(sd, "a red circle", refiner_checkpoint=str(refiner_file), refiner_switch_at=0.3,
                               callback=lambda s: first.append(s.denoised) if s.step < 3 else None, **kw)
    plain_first = []
    plain = pipeline.txt2img(sd, "a red circle", callback=lambda s: plain_first.append(s.denoised) if s.step < 3 else None,
                             **kw)
    assert all(torch.equal(a, b) for a, b in zip(first, plain_first)) and len(first) == 3
    assert refined.images[0].tobytes() != plain.images[0].tobytes() and refined.images[0].size == (96, 96)


def test_refiner_refusals(sd, refiner_file, tmp_path):
    with pytest.raises(ValueError, match="refiner_switch_at needs a refiner_checkpoint"):
        pipeline.txt2img(sd, "x", steps=1, refiner_switch_at=0.5)
    with pytest.raises(ValueError, match="no such refiner checkpoint"):
        pipeline.txt2img(sd, "x", steps=1, refiner_checkpoint=str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match="between 0 and 1, got 1.5"):
        pipeline.txt2img(sd, "x", steps=1, refiner_checkpoint=str(refiner_file), refiner_switch_at=1.5)
    plainsd.save(plainsd.build("tiny"), tmp_path / "sd1.safetensors")
    with pytest.raises(ValueError, match="works on other latents"):
        pipeline.txt2img(sd, "x", steps=1, refiner_checkpoint=str(tmp_path / "sd1.safetensors"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_refiner_is_prepared_as_the_base_model(sd, refiner_file, dtype):
    """On an engine made by runtime.prepare, the refiner is loaded in the dtype the base model's weights came in and
    prepared the same way: bf16 with packed weights and the runtime's attention, or fp16 weights computed in float32
    (runtime/storage.py). The hand-over equals the two prepared models run by hand (within 8-bit rounding); with fp16
    storage also the two models run by hand in float32 on the same fp16-rounded weights (the arithmetic is float32)."""
    import copy

    from plainsd import runtime
    from plainsd.runtime import PackedConv2d

    if dtype == torch.bfloat16 and not runtime.packing_available(torch.bfloat16):
        pytest.skip("this CPU runs no bf16 oneDNN kernels")
    engine = runtime.prepare(copy.deepcopy(sd).to(dtype))
    steps, switch, scale = 6, 0.5, 6.0
    result = pipeline.txt2img(engine, "a red circle", "blurry", steps=steps, seed=4, sampler="Euler", cfg_scale=scale,
                              refiner_checkpoint=str(refiner_file), refiner_switch_at=switch)
    refiner = engine.refiner[1]
    for part in (refiner.sd.unet, refiner.sd.vae, *refiner.sd.text_encoder.towers):
        runtime.restore(part)  # (written out after its steps: test_one_unet_in_memory_at_a_time)
    assert refiner.prepared and refiner.load_dtype == dtype and refiner.sd.dtype == engine.sd.dtype
    if dtype == torch.bfloat16:
        assert any(isinstance(m, PackedConv2d) for m in refiner.sd.unet.modules())
    else:
        assert runtime.half_stored(refiner.sd.unet) and refiner.sd.unet.out[2].weight.dtype == torch.float16
    picture = np.asarray(result.images[0], dtype=np.int16)
    by_hand = _refined_by_hand(engine.sd, refiner.sd, steps, switch, scale)
    assert np.abs(picture - np.asarray(by_hand, dtype=np.int16)).max() <= 1
    if dtype == torch.float16:
        rounded = lambda m: copy.deepcopy(m).to(dtype).float()  # noqa: E731
        in_float32 = _refined_by_hand(rounded(sd), rounded(plainsd.load(refiner_file)), steps, switch, scale)
        assert np.abs(picture - np.asarray(in_float32, dtype=np.int16)).max() <= 1


@pytest.fixture(scope="module")
def sharing_refiner_file(sd, tmp_path_factory):
    """A refiner file as Stability's is made: its own UNet, the base model's bigG tower and VAE."""
    refiner = perturb(plainsd.build("tiny-sdxl-refiner", seed=2), 2)
    refiner.text_encoder.embedders[0].model.load_state_dict(sd.text_encoder.embedders[1].model.state_dict())
    refiner.vae.load_state_dict(sd.vae.state_dict())
    return plainsd.save(refiner, tmp_path_factory.mktemp("sharing") / "refiner.safetensors")


@pytest.mark.parametrize("prepared", [False, True])
@pytest.mark.parametrize("shares", [True, False], ids=["sharing", "own-parts"])
def test_one_unet_in_memory_at_a_time(sd, sharing_refiner_file, refiner_file, prepared, shares):
    """As A1111 with its default sd_checkpoints_limit of 1: in a refiner run the base's UNet and the refiner's take
    turns in memory (the other's weights written out: runtime/offloading.py), two batches included. In the base's
    steps the base model is whole and the refiner's parts of its own are written out; in the refiner's steps only
    its UNet and the VAE that decodes its latents are in memory; the refiner's text towers come back for its
    prompts in place of the base's. The pictures equal those of an engine that keeps both (checkpoints_limit 2) bit
    for bit; after the run the base model is whole again and the refiner's UNet written out."""
    import copy

    def engine_with(limit):
        model = copy.deepcopy(sd).to(torch.bfloat16) if prepared else copy.deepcopy(sd)
        engine = runtime.prepare(model) if prepared else Engine(model)
        engine.checkpoints_limit = limit
        return engine

    def holds(*modules):
        return all(sum(t.numel() for t in m.parameters()) > 0 for m in modules)

    def held(engine):  # (base UNet, base CLIP-L, base bigG, base VAE, refiner UNet, refiner bigG, refiner VAE)
        base, refiner = engine.sd, engine.refiner[1].sd
        return tuple(holds(m) for m in (base.unet, *base.text_towers, base.vae, refiner.unet, *refiner.text_towers,
                                        refiner.vae))

    def expected(refining):  # the refiner's bigG and VAE are the base's where it shares them
        if refining:
            return (False, False, False, shares, True, False, True)
        return (True, True, True, True, False, shares, shares)

    seen, encoding = [], []
    kw = dict(steps=6, seed=3, sampler="Euler", cfg_scale=5.0, refiner_checkpoint=str(
        sharing_refiner_file if shares else refiner_file), refiner_switch_at=0.5, batch_count=2)
    one = engine_with(1)
    refiners_tower = pipeline._refiner_engine(one, kw["refiner_checkpoint"]).sd.text_towers[0]
    refiners_tower.text_model.embeddings.register_forward_hook(lambda *_: encoding.append(held(one)))
    result = pipeline.txt2img(one, "a red circle", "blurry", **kw, callback=lambda info: seen.append(held(one)))
    assert seen == [expected(refining=i >= 3) for i in range(6)] * 2
    refiners_prompts = (True, False, shares, True, False, True, shares)  # its towers in place of the base's
    assert set(encoding) == ({refiners_prompts, expected(refining=False)} if shares else {refiners_prompts})
    assert held(one) == expected(refining=False) and runtime.offloaded(one.refiner[1].sd.unet)
    both = engine_with(2)
    kept = pipeline.txt2img(both, "a red circle", "blurry", **kw)
    assert all(held(both))
    assert [p.tobytes() for p in result.images] == [p.tobytes() for p in kept.images]
    assert result.infotexts == kept.infotexts


@pytest.mark.parametrize("shares", [True, False], ids=["sharing", "own-parts"])
def test_the_base_makes_way_while_a_refiner_is_readied(sd, sharing_refiner_file, refiner_file, shares, monkeypatch):
    """With one UNet at a time, the base's parts that a new refiner does not share are written out while the refiner
    is prepared (the base's UNet before it is read); the base is whole again after."""
    import copy

    engine = runtime.prepare(copy.deepcopy(sd))
    base, seen = engine.sd, []
    holds = lambda m: sum(t.numel() for t in m.parameters()) > 0  # noqa: E731

    def spy(model, *args, **kwargs):
        seen.append(tuple(holds(m) for m in (base.unet, *base.text_towers, base.vae)))
        return runtime.prepare(model, *args, **kwargs)

    monkeypatch.setattr(pipeline, "prepare", spy)
    pipeline._refiner_engine(engine, str(sharing_refiner_file if shares else refiner_file))
    assert seen == [(False, False, shares, shares)]  # (UNet, CLIP-L, bigG, VAE): the shared bigG and VAE stay
    assert all(holds(m) for m in (base.unet, *base.text_towers, base.vae))


def test_a_refiner_that_fails_to_load_leaves_the_base_model_whole(sd, tmp_path):
    """The base's UNet is written out before a refiner is read (one UNet at a time); a file that is no checkpoint
    gives its sentence and the base's UNet is back."""
    from plainsd.weights import CheckpointError

    engine = Engine(sd)
    plain = pipeline.txt2img(engine, "a red circle", steps=2, seed=1).images[0]
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="broken.safetensors is not a readable .safetensors file"):
        pipeline.txt2img(engine, "a red circle", steps=2, seed=1, refiner_checkpoint=str(broken))
    assert not runtime.offloaded(sd.unet)
    assert pipeline.txt2img(engine, "a red circle", steps=2, seed=1).images[0].tobytes() == plain.tobytes()


def _engine_with_refiner(sd, path, refiner=None):
    """An engine whose refiner is the file (loaded as the pipeline loads it), or the model given (not shared)."""
    engine = Engine(sd)
    if refiner is None:
        pipeline._refiner_engine(engine, str(path))
    else:
        engine.refiner = (str(Path(path).resolve()), Engine(refiner))
    return engine


def test_refiner_shares_the_base_models_equal_parts(sd, refiner_file, sharing_refiner_file):
    """A refiner file whose bigG tower and VAE equal the base model's takes the base's modules (no second copy) and
    draws the picture it draws with copies of its own; one with other weights keeps its own."""
    kw = dict(steps=4, seed=5, sampler="Euler", cfg_scale=5.0, refiner_switch_at=0.5)
    engine = _engine_with_refiner(sd, sharing_refiner_file)
    refiner = engine.refiner[1].sd
    assert refiner.vae is sd.vae and refiner.text_encoder.embedders[0].model is sd.text_encoder.embedders[1].model
    shared = pipeline.txt2img(engine, "a red circle", "blurry", refiner_checkpoint=str(sharing_refiner_file), **kw)
    copies = plainsd.load(sharing_refiner_file)
    assert copies.vae is not sd.vae
    apart = _engine_with_refiner(sd, sharing_refiner_file, refiner=copies)
    separate = pipeline.txt2img(apart, "a red circle", "blurry", refiner_checkpoint=str(sharing_refiner_file), **kw)
    assert shared.images[0].tobytes() == separate.images[0].tobytes() and "Refiner" in shared.infotexts[0]
    other = _engine_with_refiner(sd, refiner_file).refiner[1].sd
    assert other.vae is not sd.vae and other.text_encoder.embedders[0].model is not sd.text_encoder.embedders[1].model


def test_refiner_shares_with_an_fp16_stored_base(sd, sharing_refiner_file):
    """On an engine prepared with fp16 weights computed in float32, the refiner loaded in fp16 still finds the
    base's bigG and VAE equal (their biases and norms float32 there: runtime/storage.py) and shares them."""
    import copy

    from plainsd import runtime

    engine = runtime.prepare(copy.deepcopy(sd).to(torch.float16))
    refiner = pipeline._refiner_engine(engine, str(sharing_refiner_file)).sd
    assert refiner.vae is engine.sd.vae
    assert refiner.text_encoder.embedders[0].model is engine.sd.text_encoder.embedders[1].model
    assert runtime.half_stored(refiner.unet) and refiner.unet.out[2].weight.dtype == torch.float16


def _lora_file(sd, folder):
    from tests.test_lora_sdxl import kohya_file

    folder.mkdir(exist_ok=True)
    return kohya_file(sd, folder / "style.safetensors", seed=3)


def _fitting_by_hand(refiner, path):
    """The LoRA's layers that have a layer of the same kohya name and weight shape in the refiner (the test's own
    reading of the rule), as a LoRA."""
    from plainsd import lora

    full = lora.read_lora(path)
    table = lora.name_table(refiner)
    fits = {}
    for key, layer in full.layers.items():
        if key in table:
            net, name = table[key]
            weight = getattr(refiner, net).get_submodule(name).weight
            if (layer.up.shape[0], *layer.down.shape[1:]) == tuple(weight.shape):
                fits[key] = layer
    return lora.LoRA(full.name, fits, {}), len(full.layers)


@pytest.mark.parametrize("kind", ["own", "shared"])
def test_lora_tags_with_a_refiner(sd, refiner_file, sharing_refiner_file, tmp_path, kind, monkeypatch):
    """A <lora:...> tag stays on when the refiner takes over, as in A1111: the base model's steps run the base with
    the LoRA merged, the refiner's steps the refiner with the LoRA's layers that fit it merged (its bigG tower takes
    the lora_te2_ layers; CLIP-L's and the UNet layers of other shapes do not fit); the run says in a note how many
    did not fit. A bigG tower the refiner shares with the base gets the LoRA once. The LoRA stays on both models
    until a run without it, after which both models' weights are bit-identical to what they were (lora.use). A run
    with the LoRAs of the run before neither fits nor adds them again: the refiner's UNet is read back once, when
    it takes over."""
    import copy

    from plainsd import lora

    path = refiner_file if kind == "own" else sharing_refiner_file
    lora_path = _lora_file(sd, tmp_path / "loras")
    engine = _engine_with_refiner(sd, path)
    refiner = engine.refiner[1].sd

    def weights():
        runtime.restore(refiner.unet)  # (written out after its steps: test_one_unet_in_memory_at_a_time)
        return [*sd.state_dict().items(), *(("r." + k, v) for k, v in refiner.state_dict().items())]

    before = {k: v.clone() for k, v in weights()}
    steps, switch, scale = 6, 0.5, 6.0
    result = pipeline.txt2img(engine, "<lora:style:0.7>a red circle", "blurry", steps=steps, seed=4, sampler="Euler",
                              cfg_scale=scale, refiner_checkpoint=str(path), refiner_switch_at=switch,
                              lora_dir=str(tmp_path / "loras"))
    restored, added, restore, add = [], [], pipeline.restore, lora._add
    monkeypatch.setattr(pipeline, "restore", lambda net: (restored.append(net is refiner.unet), restore(net))[1])
    monkeypatch.setattr(lora, "_add", lambda *a: (added.append(a), add(*a))[1])
    again = pipeline.txt2img(engine, "<lora:style:0.7>a red circle", "blurry", steps=steps, seed=4, sampler="Euler",
                             cfg_scale=scale, refiner_checkpoint=str(path), refiner_switch_at=switch,
                             lora_dir=str(tmp_path / "loras"))
    assert sum(restored) == 1 and added == [] and again.images[0].tobytes() == result.images[0].tobytes()
    monkeypatch.undo()
    assert not all(torch.equal(before[k], v) for k, v in weights())
    pipeline.txt2img(engine, "a red circle", steps=2, refiner_checkpoint=str(path), lora_dir=str(tmp_path / "loras"))
    after = weights()
    assert all(torch.equal(before[k], v) for k, v in after) and len(after) == len(before)

    base = lora.merge(copy.deepcopy(sd), lora.read_lora(lora_path), 0.7)
    alone = plainsd.load(path)  # (its own copies: the LoRA merged into them by hand)
    fitting, total = _fitting_by_hand(alone, lora_path)
    assert 0 < len(fitting.layers) < total and any(k.startswith("lora_te2_") for k in fitting.layers)
    image = _refined_by_hand(base, lora.merge(alone, fitting, 0.7), steps, switch, scale)
    d = np.abs(np.asarray(result.images[0], dtype=np.int16) - np.asarray(image, dtype=np.int16)).max()
    assert d <= 1, d
    without = _refined_by_hand(base, plainsd.load(path), steps, switch, scale)  # (the refiner without the LoRA)
    assert np.abs(np.asarray(without, dtype=np.int16) - np.asarray(image, dtype=np.int16)).max() > 3
    unfit = total - len(fitting.layers)
    assert [n for n in result.parameters.notes if "LoRA style" in n] == [
        f"{unfit} of the {total} layers of LoRA style have no layer of that name and shape in the refiner refiner, "
        "so they act in the base model's steps only"]


def test_large_pictures_are_decoded_by_tiles(sd, monkeypatch):
    """A picture over pipeline.DECODE_TILE latents on a side (512 px) is decoded by overlapping tiles, so the VAE's
    decoder never holds more than one tile's activations: a 1024x1024 SDXL picture's 128x128 latents go as nine
    64x64 tiles. Checked here at an eighth of the size (tile 8, a 128x128 picture) through txt2img, against the
    tiled decode done by hand (how close tiles come to a whole decode: tests/models/test_vae.py)."""
    from plainsd.models.vae import _starts

    tile = pipeline.DECODE_TILE
    assert _starts(1024 // 8, tile, tile - tile // 4) == [0, 48, 64]  # 3 x 3 tiles at 1024
    monkeypatch.setattr(pipeline, "DECODE_TILE", 8)
    seen, latents = [], []
    hook = sd.vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[2:])))
    decode = pipeline.decode
    monkeypatch.setattr(pipeline, "decode", lambda s, x, *a, **k: (latents.append(x), decode(s, x, *a, **k))[1])
    try:
        picture = pipeline.txt2img(sd, "a red circle", steps=2, seed=1, width=128, height=128).images[0]
    finally:
        hook.remove()
    assert seen == [(8, 8)] * 9 and picture.size == (128, 128)
    unscaled = latents[0] / sd.config.scale_factor
    with torch.no_grad():
        by_hand = sd.vae.decode_tiled(unscaled, 8, 2)
    got = torch.from_numpy(np.asarray(picture, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert (got - by_hand[0].clamp(-1, 1)).abs().max() <= 1 / 127.5 + 1e-6
