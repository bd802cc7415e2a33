"""Generation with an LCM-distilled UNet: the CFG scale goes in as the guidance embedding (cfg_scale - 1, as
diffusers' LCM pipeline), one UNet call per step, what only classifier-free guidance uses refused; the whole run
against diffusers' LatentConsistencyModelPipeline on the same random weights."""

import numpy as np
import pytest
import torch
from PIL import Image

import plainsd
from plainsd import pipeline
from plainsd.diffusion.samplers import SAMPLERS
from plainsd.request import GenerationRequest, HiresFix
from plainsd.runtime import Engine
from tests.reference import perturb
from tests.test_configs import test_config


@pytest.fixture(scope="module")
def sd():
    model = perturb(plainsd.build(test_config("tiny-lcm"), seed=0), 0)
    assert model.unet.time_embedding.cond_proj.weight.abs().min() > 0  # the embedding reaches the UNet
    return model


class Spy:
    """Wraps a UNet and records each call's batch rows and guidance."""

    def __init__(self, unet):
        self.unet, self.calls = unet, []

    def __call__(self, x, t, context, control=None, guidance=None):
        self.calls.append((x.shape[0], guidance, control is not None))
        return self.unet(x, t, context, control=control, guidance=guidance)


def _run(sd, **kw):
    spy = Spy(sd.unet)
    kw = {"prompt": "a red circle", "seed": 3, **kw}
    result = pipeline.generate(Engine(sd, unet=spy), GenerationRequest(**kw))
    return np.asarray(result.images[0], dtype=np.float64), spy.calls, result


def test_cfg_scale_is_the_guidance_embedding_one_call_per_step(sd):
    a, calls_a, _ = _run(sd, cfg_scale=8, steps=4)
    b, calls_b, _ = _run(sd, cfg_scale=2, steps=4)
    assert calls_a == [(1, 7.0, False)] * 4 and calls_b == [(1, 1.0, False)] * 4  # no unconditional half
    assert np.abs(a - b).mean() > 1.0  # the scale changes the picture
    same, _, _ = _run(sd, cfg_scale=8, steps=4)
    assert np.array_equal(a, same)


def test_batches_and_and_prompts_get_the_guidance_too(sd):
    _, calls, _ = _run(sd, cfg_scale=4, steps=2, batch_size=2)
    assert calls == [(2, 3.0, False)] * 2
    _, calls, _ = _run(sd, prompt="a red circle AND a blue square", cfg_scale=4, steps=2)
    assert calls == [(2, 3.0, False)] * 2  # the two parts, combined at scale 1 (no uncond to guide against)


def test_lcm_defaults_and_infotext(sd):
    """A request that leaves them out gets LCM-Dreamshaper's settings; the infotext keeps A1111's CFG scale."""
    _, calls, result = _run(sd)
    assert len(calls) == 4 and calls[0][1] == 7.0
    info = result.infotexts[0]
    assert "Steps: 4, Sampler: LCM" in info and "CFG scale: 8," in info and "Negative prompt" not in info
    assert pipeline.recommended(plainsd.build("tiny"))["sampler"] != "LCM"


def test_what_only_guidance_uses_is_refused(sd):
    with pytest.raises(ValueError, match="LCM-distilled.*no negative prompt"):
        pipeline.txt2img(sd, "a red circle", "blurry", steps=1)
    with pytest.raises(ValueError, match="no negative prompt"):
        pipeline.generate(sd, GenerationRequest("a red circle", steps=1, hires=HiresFix(scale=1.5, negative_prompt="x")))
    with pytest.raises(ValueError, match="guidance_until must be 1"):
        pipeline.txt2img(sd, "a red circle", steps=1, guidance_until=0.5)


def test_fast_mode_and_controlnet_pass_the_guidance_on(sd, tmp_path):
    """DeepCache's partial calls embed the guidance; a ControlNet's residuals reach the UNet with it."""
    from plainsd.request import ControlUnit
    from plainsd.weights import save_controlnet
    from tests.test_control import random_controlnet

    fast_8, _, _ = _run(sd, cfg_scale=8, steps=4, fast=plainsd.fast.FAST)
    fast_2, _, _ = _run(sd, cfg_scale=2, steps=4, fast=plainsd.fast.FAST)
    assert np.abs(fast_8 - fast_2).mean() > 1.0
    save_controlnet(random_controlnet(plainsd.build("tiny").unet.config, 0), tmp_path / "cn.safetensors")
    unit = ControlUnit(model="cn", image=Image.new("RGB", (64, 64), (200, 90, 30)), module="none")
    _, calls, _ = _run(sd, cfg_scale=8, steps=2, controlnet=(unit,), controlnet_dir=str(tmp_path))
    assert calls == [(1, 7.0, True)] * 2


def test_whole_run_matches_diffusers_lcm_pipeline(reference, record_parity):
    """plainsd's LCM sampler on the "lcm" schedule (diffusers' timesteps: 999, 759, 499, 259) against
    LatentConsistencyModelPipeline with LCMScheduler: the same weights (a diffusers folder
    plainsd loaded), the same text states, the same starting and added noise (the image's generator)."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    config, unet, vae, _, _, sd = reference("tiny-lcm")
    contexts = []
    engine = Engine(sd, unet=lambda x, t, c, **kw: contexts.append(c) or sd.unet(x, t, c, **kw))
    steps, seed, scale = 4, 5, 6.0
    request = GenerationRequest("a red circle", seed=seed, steps=steps, sampler="LCM", schedule="lcm",
                                cfg_scale=scale, width=64, height=64)
    ours = np.asarray(pipeline.generate(engine, request).images[0], dtype=np.float64)

    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    pipe = LatentConsistencyModelPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    sigma_max = float(pipeline._denoiser(sd, sampler=SAMPLERS["LCM"]).get_sigmas(steps, "lcm")[0])
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, 4, 8, 8), generator=g)  # the image's noise; g goes on to give the steps' noise
    with torch.no_grad():
        theirs = pipe(prompt_embeds=contexts[0], timesteps=[999, 759, 499, 259], guidance_scale=scale,
                      latents=noise * sigma_max / (1 + sigma_max**2) ** 0.5, generator=g, output_type="np").images[0]
    d = np.abs(ours - theirs * 255).max()
    record_parity("txt2img tiny-lcm, 4 LCM steps vs LatentConsistencyModelPipeline (0-255)", float(d))
    assert d <= 1.0, d  # (ours rounded to 8 bits)
    assert ours.std() > 5  # a picture, not a flat field
