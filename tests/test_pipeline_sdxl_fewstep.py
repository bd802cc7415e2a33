"""SDXL-Turbo and SDXL-Lightning style runs: Euler a / Euler on trailing timesteps for 1 to 4 steps without
guidance draw what diffusers' StableDiffusionXLPipeline draws with EulerAncestralDiscreteScheduler /
EulerDiscreteScheduler(timestep_spacing="trailing") and guidance_scale 0 (the same weights, seed and generator);
the files are recognised and run with those settings where the request leaves them out."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import plainsd
from plainsd import pipeline
from plainsd.models.tokenizer import Tokenizer
from plainsd.pnginfo import parse_infotext
from plainsd.weights import LIGHTNING_DEFAULTS, TURBO_DEFAULTS, read_config
from tests.reference import sdxl_text_reference
from tests.test_pipeline_fewstep import UNetCalls


def _diffusers_picture(parts, scheduler, prompt: str, seed: int, steps: int):
    """StableDiffusionXLPipeline's 64x64 picture (0-1) from the tiny reference parts (unet, vae, text, text2) with
    this scheduler, without guidance, from the text states of the prompt and a generator seeded like ours."""
    from diffusers import StableDiffusionXLPipeline

    unet, vae, text, text2 = parts
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text2, tokenizer=None, tokenizer_2=None,
                                     unet=unet, scheduler=scheduler, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        states, pooled = sdxl_text_reference(text, text2, Tokenizer("sd1")([prompt]), Tokenizer("sd2")([prompt]))
        return pipe(prompt_embeds=states, pooled_prompt_embeds=pooled, num_inference_steps=steps, guidance_scale=0.0,
                    height=64, width=64, generator=torch.Generator().manual_seed(seed), output_type="np").images[0]


@pytest.mark.parametrize("sampler, steps", [("Euler a", 1), ("Euler a", 4), ("Euler", 2), ("Euler", 3)])
def test_trailing_few_steps_match_diffusers(sdxl_reference, record_parity, sampler, steps):
    """Ours from the prompt at CFG scale 1 (one UNet row, no negative prompt); diffusers from the same text states
    at guidance_scale 0 (no classifier-free guidance either), its latents and its ancestral noise drawn from a
    generator seeded like ours (one per image: the starting noise first, then each step's)."""
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    _, unet, vae, text, text2, sd = sdxl_reference("tiny-sdxl")
    seed, prompt = 7, "a red circle on the left"
    with UNetCalls(sd.unet) as calls:
        result = pipeline.txt2img(sd, prompt, seed=seed, steps=steps, sampler=sampler, schedule="trailing",
                                  cfg_scale=1.0, width=64, height=64)
    ours = np.asarray(result.images[0], dtype=np.float64)

    kind = EulerAncestralDiscreteScheduler if sampler == "Euler a" else EulerDiscreteScheduler
    scheduler = kind(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing")
    theirs = _diffusers_picture((unet, vae, text, text2), scheduler, prompt, seed, steps)
    d = np.abs(ours - theirs * 255).max()
    record_parity(f"txt2img tiny-sdxl, {steps} {sampler} trailing steps, no CFG vs StableDiffusionXLPipeline (0-255)", float(d))
    assert calls.timesteps == pytest.approx(scheduler.timesteps.tolist(), abs=1e-3) and calls.batches == [1] * steps
    assert d <= 1.0, d
    assert ours.std() > 5


@pytest.mark.parametrize("steps", [1, 2])
def test_sample_prediction_matches_diffusers(sdxl_reference, record_parity, tmp_path, steps):
    """A UNet that predicts the clean sample (SDXL-Lightning's 1-step model): a diffusers folder whose scheduler says
    prediction_type "sample" loads as prediction "x0", and Euler on trailing timesteps without guidance draws what
    StableDiffusionXLPipeline draws with EulerDiscreteScheduler(prediction_type="sample", timestep_spacing="trailing")
    from the same weights and seed, as the model card runs it."""
    import json

    from diffusers import EulerDiscreteScheduler

    from tests.reference import write_diffusers_sdxl_folder

    _, unet, vae, text, text2, _ = sdxl_reference("tiny-sdxl")
    folder = write_diffusers_sdxl_folder(tmp_path / "x0", unet, vae, text, text2)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "sample"}))
    sd = plainsd.load(folder)
    assert sd.config.prediction == "x0"
    seed, prompt = 3, "a red circle on the left"
    result = pipeline.txt2img(sd, prompt, seed=seed, steps=steps, sampler="Euler", schedule="trailing", cfg_scale=1.0)
    ours = np.asarray(result.images[0], dtype=np.float64)

    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="trailing", prediction_type="sample")
    theirs = _diffusers_picture((unet, vae, text, text2), scheduler, prompt, seed, steps)
    d = np.abs(ours - theirs * 255).max()
    record_parity(f"txt2img tiny-sdxl x0 prediction, {steps} Euler trailing steps vs StableDiffusionXLPipeline (0-255)",
                  float(d))
    assert d <= 1.0, d
    eps = plainsd.load(folder, prediction="eps")  # (the same weights read as a noise prediction draw another picture)
    other = pipeline.txt2img(eps, prompt, seed=seed, steps=steps, sampler="Euler", schedule="trailing", cfg_scale=1.0)
    assert np.abs(np.asarray(other.images[0], dtype=np.float64) - ours).max() > 10


def _named(sd, path, extra=None, metadata=None):
    """The model saved under a name (and with extra tensors or metadata, as published files carry)."""
    plainsd.save(sd, path)
    if extra or metadata:
        save_file({**load_file(str(path)), **(extra or {})}, str(path), metadata)
    return path


def test_turbo_and_lightning_files_get_their_settings(tmp_path):
    """SDXL-Turbo by name or ModelSpec architecture: Euler a, 1 step, CFG 1, 512; SDXL-Lightning by name, with the
    step count its name gives: Euler on trailing timesteps, CFG 1. A plain SDXL file from sgm (denoiser.sigmas)
    gets nothing; Lightning's 1-step x0 file predicts the clean sample and gets 1 step."""
    sd = plainsd.build("tiny-sdxl", seed=0)
    assert plainsd.load(_named(sd, tmp_path / "sd_xl_turbo_1.0_fp16.safetensors")).defaults == TURBO_DEFAULTS
    spec = {"modelspec.architecture": "stable-diffusion-xl-turbo-v1"}
    assert plainsd.load(_named(sd, tmp_path / "a.safetensors", metadata=spec)).defaults == TURBO_DEFAULTS
    plain = _named(sd, tmp_path / "sd_xl_base.safetensors", extra={"denoiser.sigmas": torch.ones(1000)})
    assert plainsd.load(plain).defaults == {}
    assert plainsd.load(_named(sd, tmp_path / "sdxl_lightning_8step.safetensors")).defaults == \
        {**LIGHTNING_DEFAULTS, "steps": 8}
    assert plainsd.load(_named(sd, tmp_path / "juggernautXL_lightning.safetensors")).defaults == LIGHTNING_DEFAULTS
    one_step = _named(sd, tmp_path / "sdxl_lightning_1step_x0.safetensors")
    x0 = plainsd.load(one_step)
    assert x0.config.prediction == "x0" and x0.defaults == {**LIGHTNING_DEFAULTS, "steps": 1}
    assert (x0.defaults["sampler"], x0.defaults["schedule"], x0.defaults["cfg_scale"]) == ("Euler", "trailing", 1.0)
    assert read_config(one_step).prediction == "x0" and plainsd.load(one_step, prediction="eps").config.prediction == "eps"
    assert plainsd.load(_named(sd, tmp_path / "sdxl_lightning_1step.safetensors")).config.prediction == "eps"
    with pytest.raises(ValueError, match="prediction must be 'eps', 'v' or 'x0', got 'sample'"):
        plainsd.load(one_step, prediction="sample")

    lightning = plainsd.load(_named(sd, tmp_path / "sdxl_lightning_2step.safetensors"))
    with UNetCalls(lightning.unet) as calls:
        r = pipeline.txt2img(lightning, "a red circle", seed=1)
    fields = parse_infotext(r.infotexts[0])
    assert (fields["Steps"], fields["Sampler"], fields["Schedule type"], fields["CFG scale"]) == \
        ("2", "Euler", "Trailing", "1")
    assert calls.timesteps == pytest.approx([999, 499], abs=1e-3) and calls.batches == [1, 1]
    assert r.images[0].size == (64, 64)  # the model's own size (SDXL's 1024 at full size)
    assert any("recommended settings used" in n and "steps 2" in n for n in r.parameters.notes)
