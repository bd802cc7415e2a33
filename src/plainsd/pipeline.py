"""txt2img, img2img and inpainting: the one place where the networks and the samplers meet.

    result = txt2img(sd, "a red circle", steps=20, sampler="DPM++ 2M", seed=1)
    result.images[0].save("out.png")

A run goes through named stages (generate): settings (the model's recommendations filled in, the request
checked) -> start (an init image's latents and a mask) -> passes with their conditioning (a Pass is one run of a
sampler; the hires fix is a second Pass at the larger size) -> each batch's noise through the passes -> decode
-> infotext.

Seeds: image i of a run gets seed + i, and its noise (the initial latents and any noise a sampler adds
later) comes from its own generator, so an image is the same whether it was made alone or in a batch. With a
variation seed (subseed_strength > 0) every image keeps the seed and image i gets subseed + i, as in A1111;
diffusion/noise.py draws and blends the noise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from . import control as control_mod
from . import images as imgs
from . import lora as lora_mod
from . import upscale as upscale_mod
from .diffusion import samplers as S
from .diffusion.denoisers import DiscreteDenoiser, LCMDenoiser
from .diffusion.guidance import CFGDenoiser, Conditioning, ScheduledCond
from .diffusion.noise import ImageNoise
from .embeddings import load_embeddings
from .fast import FAST, DeepCacheUNet, FastSettings
from .models import StableDiffusion
from .models.sdxl import conditioning, size_numbers
from .prompts import encode_prompt, extract_loras, prompt_schedule, split_and
from .request import (DEFAULTS, IMAGE_UPSCALERS, LATENT_UPSCALERS, MAX_SEED, GenerationRequest, HiresFix,
                      Parameters, sampler_fields)
from .runtime import Engine, offload, prepare, release_freed_memory, restore
from .weights import load, load_tiny_decoder, load_vae

__all__ = ["txt2img", "img2img", "inpaint", "outpaint", "outpaint_request", "generate", "GenerationRequest",
           "HiresFix", "Parameters", "Result", "StepInfo", "Interrupted", "recommended", "decode", "DEFAULTS",
           "LATENT_UPSCALERS", "IMAGE_UPSCALERS", "MAX_SEED"]


class Interrupted(Exception):
    """Raised inside a run to stop it; the run returns what it has."""


class _Skipped(Exception):
    """Raised inside a run to end the current batch early and go on with the next (A1111's Skip)."""


@dataclass
class Result:
    images: list[Image.Image]
    seeds: list[int]
    infotexts: list[str]
    parameters: Parameters
    frames: list[list[Image.Image]] = field(default_factory=list)  # per image, one frame per step (record_steps)
    interrupted: bool = False
    subseeds: list[int] = field(default_factory=list)  # each image's variation seed
    control_maps: list[list[Image.Image]] = field(default_factory=list)  # per ControlNet unit, its hint per pass


@dataclass
class StepInfo:
    """What a step callback receives."""
    step: int                 # 0-based step of this batch
    total: int                # steps in this batch
    batch: int                # which batch of the run (batch_count)
    latents: torch.Tensor     # current noisy latents (sigma scaling)
    denoised: torch.Tensor    # the current estimate of the clean latents
    sigma: float

    def preview(self) -> list[Image.Image]:
        """Cheap RGB previews of the current estimate (no VAE)."""
        return imgs.latent_preview(self.denoised)


# --- the public functions ------------------------------------------------------------------------------

def txt2img(sd: StableDiffusion | Engine, prompt: str, negative_prompt: str = "", **kwargs) -> Result:
    """Text to image. The keyword arguments are GenerationRequest's fields (steps, sampler, schedule, cfg_scale,
    seed, width, height, batch_size, batch_count, clip_skip, eta, guidance_until, lora_dir, embeddings_dir,
    fast, token_merging, hires) and generate's (callback, interrupt, skip, progress, record_steps)."""
    for key in ("init_image", "mask"):
        if kwargs.get(key) is not None:
            raise TypeError(f"txt2img takes no {key}; use img2img or inpaint")
    return _call(sd, prompt, negative_prompt, kwargs)


def img2img(sd: StableDiffusion | Engine, init_image: Image.Image, prompt: str, negative_prompt: str = "", *,
            strength: float = 0.8, resize_mode: str = "just resize", **kwargs) -> Result:
    """Image to image: the init image is noised to `strength` (0 keeps it, 1 replaces it) and denoised."""
    return _call(sd, prompt, negative_prompt, dict(kwargs, init_image=init_image, strength=strength,
                                                   resize_mode=resize_mode))


def inpaint(sd: StableDiffusion | Engine, init_image: Image.Image, mask: Image.Image, prompt: str,
            negative_prompt: str = "", *, strength: float = 0.75, mask_blur: int = 4,
            inpainting_mask_invert: bool = False, **kwargs) -> Result:
    """Repaint the white part of the mask: at every step the original latents are kept outside the mask (as A1111
    blends them; 9-channel inpainting models also see the mask and the masked image). The result is pasted over
    the original through the blurred mask, so the unmasked part stays exactly as it was. A1111's options are keyword
    arguments: inpainting_fill (what the masked area starts from), inpaint_full_res ("only masked": the masked
    area drawn on its own at width x height) with inpaint_full_res_padding, mask_round, initial_noise_multiplier,
    latent_mask."""
    return _call(sd, prompt, negative_prompt, dict(kwargs, init_image=init_image, mask=mask, strength=strength,
                                                   mask_blur=mask_blur, inpainting_mask_invert=inpainting_mask_invert))


def outpaint(sd: StableDiffusion | Engine, image: Image.Image, prompt: str, negative_prompt: str = "", *,
             left: int = 0, right: int = 0, top: int = 0, bottom: int = 0, mask_blur: int = 4,
             inpainting_fill: str | int = "fill", strength: float = 0.75, **kwargs) -> Result:
    """Extend the picture by left / right / top / bottom pixels and draw the new area (A1111's "Poor man's
    outpainting", outpaint_request); the picture itself stays as it was. The other keyword arguments are
    inpaint's; the drawing size is the widened canvas."""
    for key in ("init_image", "mask", "latent_mask", "width", "height"):
        if kwargs.get(key) is not None:
            raise TypeError(f"outpaint takes no {key}: it draws the widened canvas with its own masks")
    controls = {k: kwargs.pop(k) for k in _CONTROLS if k in kwargs}
    request = _request(prompt, negative_prompt, dict(kwargs, strength=strength))
    request = outpaint_request(request, image, left=left, right=right, top=top, bottom=bottom, mask_blur=mask_blur,
                               inpainting_fill=inpainting_fill)
    return generate(sd, request, **controls)


def outpaint_request(request: GenerationRequest, image: Image.Image, *, left: int = 0, right: int = 0, top: int = 0,
                     bottom: int = 0, mask_blur: int = 4, inpainting_fill: str | int = "fill") -> GenerationRequest:
    """A request made into A1111's "Poor man's outpainting" of image: the canvas widened by the pixels given for
    each side (rounded up to multiples of 64, images.outpaint_canvas), white over the new area in the mask, blurred
    by mask_blur * 2 (as A1111 doubles it), a sharper latent mask for the latents and the fill, and the masked
    content (A1111's default here: fill). The whole canvas is drawn in one pass, at its own size (A1111 draws it in
    tiles of the request's width x height that overlap by the pixels added)."""
    sides = {"left": left, "right": right, "top": top, "bottom": bottom}
    for name, value in sides.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"outpainting's {name} must be a whole number of pixels, 0 or more, got {value!r}")
    if not any(sides.values()):
        raise ValueError("outpainting needs at least one side to extend: give left, right, top or bottom pixels")
    if isinstance(mask_blur, bool) or not isinstance(mask_blur, int) or mask_blur < 0:
        raise ValueError(f"outpainting's mask blur must be a whole number, 0 or more, got {mask_blur!r}")
    canvas, mask, latent_mask = imgs.outpaint_canvas(image, left, right, top, bottom, mask_blur)
    return request.replace(init_image=canvas, mask=mask, latent_mask=latent_mask, mask_blur=mask_blur * 2,
                           inpainting_fill=inpainting_fill, inpaint_full_res=False, inpainting_mask_invert=False,
                           width=canvas.width, height=canvas.height, resize_mode="just resize")


_CONTROLS = ("callback", "interrupt", "skip", "progress", "record_steps")


def _call(sd, prompt: str, negative_prompt: str, kwargs: dict) -> Result:
    controls = {k: kwargs.pop(k) for k in _CONTROLS if k in kwargs}
    return generate(sd, _request(prompt, negative_prompt, kwargs), **controls)


def _request(prompt: str, negative_prompt: str, kwargs: dict) -> GenerationRequest:
    fast = kwargs.pop("fast", None)
    return GenerationRequest(prompt=prompt, negative_prompt=negative_prompt,
                             fast=FAST if fast is True else (fast or None), **kwargs)


# What an LCM-distilled UNet (one with a guidance-scale embedding) is run with unless its file or the request says
# otherwise: LCM-Dreamshaper-v7's card and diffusers' LCM pipeline example (4 steps, guidance 8) with the LCM sampler.
LCM_DEFAULTS = {"steps": 4, "sampler": "LCM", "cfg_scale": 8.0}


def recommended(sd: StableDiffusion | Engine, sampler: str | None = None) -> dict:
    """The settings a request with this sampler (None: left out) gets where it leaves them out: the model's own
    recommendations (model_recommendations), then LCM_DEFAULTS for an LCM-distilled model, then DEFAULTS."""
    sd = sd.sd if isinstance(sd, Engine) else sd
    return {**_fallbacks(sd), **model_recommendations(sd, sampler)}


def _fallbacks(sd: StableDiffusion) -> dict:
    """What a model's own recommendations leave out: LCM_DEFAULTS for an LCM-distilled model, then DEFAULTS."""
    return {**DEFAULTS, **(LCM_DEFAULTS if _embeds_guidance(sd) else {})}


def model_recommendations(sd: StableDiffusion, sampler: str | None = None) -> dict:
    """The model's own recommended settings (sd.defaults). Where they carry a with_lora set (the shipped model: its
    LCM-LoRA, 4 LCM steps, CFG 1) whose LoRA is shipped and fits the model, a request whose sampler is left out or is
    the set's own gets that set, its "lora" included (_with_recommended_lora); other samplers get the plain set."""
    own = {k: v for k, v in sd.defaults.items() if k != "with_lora"}
    few = sd.defaults.get("with_lora")
    if few and (sampler is None or _same_sampler(sampler, few["sampler"])) and lora_mod.fits_shipped(sd, few["lora"]):
        own.update(few)
    return own


def _same_sampler(name: str, other: str) -> bool:
    try:
        return S.resolve_sampler(name)[0].name == S.resolve_sampler(other)[0].name
    except ValueError:  # (an unknown name: request.check says so)
        return False


def _with_recommended_lora(req: GenerationRequest, chosen: dict) -> GenerationRequest:
    """The request with the recommended LoRA's tag, <lora:NAME:1>, added to its prompt (and hires prompt), unless
    the prompt names that LoRA already (with weight 0 it is left out). The infotext then carries the tag, so that
    A1111 draws the same picture from it."""
    name = chosen.get("lora")
    if name is None or any(n == name for n, _ in extract_loras(req.prompt)[1]):
        return req
    tag = f" <lora:{name}:1>"
    hires = req.hires
    if hires is not None and hires.prompt:
        hires = dataclasses.replace(hires, prompt=hires.prompt + tag)
    return req.replace(prompt=req.prompt + tag, hires=hires)


def as_engine(sd: StableDiffusion | Engine) -> Engine:
    """A model as the pipeline runs it: an Engine as it is (runtime.prepare made it), a bare model eagerly."""
    return sd if isinstance(sd, Engine) else Engine(sd)


# --- the stages ------------------------------------------------------------------------------------------

def generate(sd: StableDiffusion | Engine, request: GenerationRequest, *,
             callback: Callable[[StepInfo], None] | None = None, interrupt: Callable[[], bool] | None = None,
             skip: Callable[[], bool] | None = None, progress: bool = False, record_steps: bool = False) -> Result:
    """Run a request: 1. settings, 2. the start (an init image's latents, a mask), 3. the passes with their
    conditioning, 4. each batch's noise and passes, 5. decode, 6. infotext. callback(StepInfo) after each step; interrupt() -> True stops and returns what there
    is; skip() -> True ends the batch early and goes on with the next; progress: a bar per step; record_steps:
    one decoded frame per step (Result.frames)."""
    engine = as_engine(sd)
    sd = engine.sd
    _resident(engine, sd.unet)
    try:
        return _stages(engine, request, callback, interrupt, skip, progress, record_steps)
    finally:
        _resident(engine, sd.unet)  # (the refiner's steps ran last: its UNet makes way again)


def _stages(engine: Engine, request: GenerationRequest, callback, interrupt, skip, progress: bool,
            record_steps: bool) -> Result:
    """generate's stages, with the base model's UNet in memory to begin with (_resident)."""
    sd = engine.sd
    request, params, run = _settings(engine, request)
    tags = extract_loras(request.prompt)[1]
    loras = lora_mod.resolve(tags, request.lora_dir)
    params.lora_hashes = lora_mod.infotext_hashes(tags, loras)
    embeddings = load_embeddings(request.embeddings_dir, sd) if request.embeddings_dir is not None else None
    encode = _TextStates(sd, request.clip_skip, embeddings)
    refiner = _load_refiner(engine, request) if request.refiner_checkpoint else None
    lora_mod.use(sd, loras)  # (they stay on for the next run: lora.use)
    notes = _refiner_loras(engine, refiner, loras)
    with _tiling(engine, request.tiling, refiner):
        start = _start(sd, request, run)
        params.inpainting = Parameters.inpainting_fields(request, start.paste is not None,
                                                         start.paste is not None and start.paste[2] is not None)
        first = _first_pass(engine, request, params, run, start, encode)
        second = _second_pass(engine, request, params, run, first, encode) if request.hires else None
        if request.refiner_checkpoint:  # (A1111's default: in the hires fix's pass, where there is one)
            (second or first).refiner = _refiner(engine, request, params, hires=second is not None)
        last = second or first
        control_maps = _controlnet(engine, request, params, start, first, second) if request.controlnet else []
        hooks = _Hooks(callback, interrupt, skip, progress, record_steps,
                       total=len(first.sigmas) - 1 + (len(second.sigmas) - 1 if second else 0))
        result = Result([], [], [], params, control_maps=control_maps)
        for batch in range(request.batch_count):
            images = [batch * request.batch_size + i for i in range(request.batch_size)]
            seeds = [params.seed + (0 if params.subseed_strength else i) for i in images]
            subseeds = [params.subseed + i for i in images]
            latents = _run_batch(engine, run, start, first, second, seeds, subseeds, hooks.for_batch(batch))
            refined = last.refiner is not None and last.refiner.took_over
            decoder = last.refiner.engine.sd if refined else sd
            if refined:  # A1111 decodes with the model loaded last: the refiner, with its VAE (_refiner_vae); the
                # infotext names that VAE, where A1111's names the base's (chosen before sampling)
                params.refiner, params.refiner_switch_at = last.refiner.title, last.refiner.switch_at
                params.vae_name = getattr(decoder.vae, "name", None)
                params.vae_hash = getattr(decoder.vae, "hash", None)
                params.notes += [n for n in notes if n not in params.notes]
            pictures = decode(decoder, latents, run.tiny, wrap=request.tiling)
            if start.paste is not None:
                pictures = [_paste(p, *start.paste) for p in pictures]
            if record_steps:
                decoded = [decode(decoder, f / (1 + s**2) ** 0.5, run.tiny, request.tiling)
                           for f, s in hooks.frames] + [pictures]
                result.frames.extend([[step[i] for step in decoded] for i in range(request.batch_size)])
            result.images += pictures
            result.seeds += seeds
            result.subseeds += subseeds
            if any(part.skipped_uncond for part in (first, second) if part is not None):
                params.ngms = request.s_min_uncond
            result.infotexts += [params.infotext(s, sub) for s, sub in zip(seeds, subseeds)]
            if hooks.interrupted:
                result.interrupted = True
                break
    return result


@dataclass
class _Run:
    """What the settings stage decides beyond Parameters: the samplers, the schedule, fast mode's parts."""
    sampler: S.SamplerInfo
    sigmas: torch.Tensor              # the whole schedule of the first pass's steps
    hires_sampler: S.SamplerInfo | None
    latent_shape: tuple[int, int, int]
    fast: FastSettings | None
    tiny: torch.nn.Module | None      # the tiny decoder, when fast mode asks for it
    noise: ImageNoise = field(default_factory=ImageNoise)   # variation seed, seed resize, ENSD


@dataclass
class _Start:
    """What the first pass starts from: all noise (txt2img), or an init image's latents noised to its strength."""
    sigmas: torch.Tensor              # the first pass's (img2img: the last `strength` of the schedule)
    init_latent: torch.Tensor | None = None
    keep: torch.Tensor | None = None  # inpainting: 1 where the original latent stays
    concat: torch.Tensor | None = None    # an inpainting model's extra input channels
    paste: tuple[Image.Image, Image.Image, tuple | None] | None = None  # (original, mask, "only masked" box)
    noise_in: torch.Tensor | None = None  # masked content "latent noise": 1 where the start latent is the noise
    noise_multiplier: float = 1.0     # img2img's starting noise times this (A1111's initial_noise_multiplier)


def _settings(engine: Engine, req: GenerationRequest) -> tuple[GenerationRequest, Parameters, _Run]:
    """1. The request with its styles applied and the model's recommendations filled in, what the run will use,
    the sampler and its sigmas."""
    sd = engine.sd
    req = req.styled()  # A1111 applies styles before anything else reads the prompts
    mine = model_recommendations(sd, req.sampler)
    chosen = {**_fallbacks(sd), **mine}  # recommended(sd, req.sampler), the model's part computed once
    notes = _notes(sd, req, mine, chosen["sampler"])
    req = _with_recommended_lora(req, chosen)
    steps = chosen["steps"] if req.steps is None else req.steps
    init = req.init_image
    width = req.width or (init.width // 8 * 8 if init is not None else chosen.get("width", sd.config.resolution))
    height = req.height or (init.height // 8 * 8 if init is not None else chosen.get("height", sd.config.resolution))
    req = req.replace(steps=steps, width=width, height=height,
                      sampler=chosen["sampler"] if req.sampler is None else req.sampler,
                      schedule=_schedule(chosen, req),
                      cfg_scale=chosen["cfg_scale"] if req.cfg_scale is None else req.cfg_scale,
                      guidance_until=chosen["guidance_until"] if req.guidance_until is None else req.guidance_until)
    _check_sdxl(engine, req)
    req.check(sd.config.vae.factor, engine.backend)
    _check_guidance_embedding(sd, req)
    info, schedule = S.resolve_sampler(req.sampler, req.schedule)
    fast = req.fast
    guidance_until = min(req.guidance_until, fast.guidance_until) if fast is not None else req.guidance_until
    if _embeds_guidance(sd):
        guidance_until = 1.0  # (fast mode's guidance cut-off: an LCM runs no classifier-free guidance to cut)
    deepcache = fast is not None and fast.deepcache_interval > 1 and engine.backend == "eager"
    tiny = _tiny_decoder(engine) if fast is not None and fast.tiny_decoder else None
    hires = req.hires
    hr_info, hr_schedule = hires.resolve(req.sampler, req.schedule) if hires else (None, None)
    params = Parameters(
        prompt=req.prompt, negative_prompt=req.negative_prompt, steps=steps, sampler=info.name, schedule=schedule,
        cfg_scale=req.cfg_scale, guidance_until=guidance_until, seed=req.first_seed(), width=width, height=height,
        batch_size=req.batch_size, batch_count=req.batch_count, clip_skip=req.clip_skip or _default_clip_skip(sd),
        denoising_strength=req.strength if init is not None else (hires.strength if hires else None),
        model=sd.name, model_hash=sd.hash, vae_name=getattr(sd.vae, "name", None), vae_hash=getattr(sd.vae, "hash", None),
        deepcache=fast.deepcache_interval if deepcache else None, tiny_decoder=tiny is not None,
        token_merging=req.token_merging or None, hires=hires,
        hires_sampler=hr_info.name if hires else None, hires_schedule=hr_schedule, **_seed_fields(req, [info, *([hr_info] if hires else [])]))
    params.notes = notes
    factor = sd.config.vae.factor
    resize = (req.seed_resize_from_h // factor, req.seed_resize_from_w // factor) if params.seed_resize_from else None
    run = _Run(info, S.schedule_sigmas(_denoiser(sd, sampler=info), info, steps, schedule), hr_info,
               (sd.config.vae.z_channels, height // factor, width // factor), fast, tiny,
               ImageNoise(req.subseed_strength, resize, req.eta_noise_seed_delta, req.randn_source))
    return req, params, run


def _default_clip_skip(sd: StableDiffusion) -> int:
    """The clip skip a run without one records: the model's; for SDXL 1, as A1111 writes nothing for it (its towers'
    penultimate layers are the model's own, not a clip skip)."""
    return 1 if sd.config.sdxl else sd.config.text.clip_skip


def _schedule(chosen: dict, req: GenerationRequest) -> str:
    """The request's schedule; left out, the model's recommended one if the request keeps the recommended sampler,
    else the chosen sampler's own ("automatic"): a recommendation made for DPM++ 2M is not one for LCM."""
    if req.schedule is not None:
        return req.schedule
    return chosen["schedule"] if req.sampler in (None, chosen["sampler"]) else DEFAULTS["schedule"]


def _embeds_guidance(sd: StableDiffusion) -> bool:
    """Whether the model's UNet takes the guidance scale as an input (LCM-distilled: models/unet.py)."""
    return sd.config.unet.time_cond_proj_dim > 0


def _check_guidance_embedding(sd: StableDiffusion, req: GenerationRequest) -> None:
    """An LCM-distilled UNet gets the CFG scale as its guidance embedding and runs no classifier-free guidance, so
    what only guidance uses is refused rather than dropped: a negative prompt (its distillation guided against the
    empty prompt, and diffusers' LCM pipeline takes none) and a guidance cut-off."""
    if not _embeds_guidance(sd):
        return
    if req.negative_prompt or (req.hires is not None and req.hires.negative_prompt):
        raise ValueError("the model is LCM-distilled: its CFG scale is an input of the UNet and "
                         "it runs no classifier-free guidance, so it takes no negative prompt; leave it empty")
    if req.guidance_until < 1.0:
        raise ValueError("the model is LCM-distilled and runs no classifier-free guidance to cut "
                         f"off: guidance_until must be 1, got {req.guidance_until}")


def _check_sdxl(engine: Engine, req: GenerationRequest) -> None:
    """What plainsd does not yet run with an SDXL model is refused rather than dropped: the OpenVINO backend. (A
    ControlNet or T2I-Adapter unit's network is checked against the model as it loads: control._check_fits.)"""
    if not engine.sd.config.sdxl:
        return
    if engine.backend != "eager":
        raise ValueError(f"SDXL models run on the eager backend, not yet on {engine.backend}")


def _lcm_guidance(sd: StableDiffusion, cfg_scale: float) -> float | None:
    """The guidance scale an LCM-distilled UNet embeds for a CFG scale: cfg_scale - 1, as diffusers' LCM pipeline
    passes it (the distillation's w is in the original CFG formulation, eps_cond + w (eps_cond - eps_uncond));
    None for other models."""
    return cfg_scale - 1.0 if _embeds_guidance(sd) else None


def _notes(sd: StableDiffusion, req: GenerationRequest, mine: dict, sampler: str) -> list[str]:
    """What a run should tell its user beyond the infotext: the model's recommended settings it used where the
    request left them out (mine: model_recommendations for the request; sampler: the recommended one), say an
    SD-Turbo file's few-step settings, and that at CFG scale 1 the negative prompt has no effect (the unconditional
    half is skipped, as Forge does; A1111 computes it to the same result)."""
    notes = []
    names = {"steps": "steps", "sampler": "sampler", "schedule": "schedule", "cfg_scale": "CFG scale",
             "width": "width", "height": "height"}
    left_out = {key: getattr(req, key) is None for key in names}
    left_out.update(width=not req.width and req.init_image is None, height=not req.height and req.init_image is None,
                    schedule=req.schedule is None and req.sampler in (None, sampler))
    used = [f"{label} {mine[key]}" for key, label in names.items() if key in mine and left_out[key]]
    if "lora" in mine and all(n != mine["lora"] for n, _ in extract_loras(req.prompt)[1]):
        used.append(f"LoRA {mine['lora']} (<lora:{mine['lora']}:1> added to the prompt; another sampler, or the tag "
                    "at weight 0, leaves it out)")
    if used:
        notes.append(f"{sd.name}'s recommended settings used (set them to override): {', '.join(used)}")
    cfg = mine.get("cfg_scale", DEFAULTS["cfg_scale"]) if req.cfg_scale is None else req.cfg_scale
    if cfg == 1 and req.negative_prompt.strip() and len(split_and(extract_loras(req.prompt)[0])) == 1:
        notes.append("CFG scale 1: the unconditional half is skipped, so the negative prompt has no effect")
    return notes


def _seed_fields(req: GenerationRequest, infos: list[S.SamplerInfo]) -> dict:
    """Parameters' variation seed, seed resize, tiling, ENSD (where a sampler's noise comes from the image's
    generator, so that it changes something) and the samplers' settings as A1111 writes them (the first pass's,
    then what only the hires fix's sampler adds)."""
    options = [req.sampler_options(info) for info in infos]
    uses_generators = any(_uses_generators(info, opts) for info, opts in zip(infos, options))
    fields = {}
    for info, opts in reversed(list(zip(infos, options))):
        fields.update(sampler_fields(opts, info))
    resize = (req.seed_resize_from_w, req.seed_resize_from_h)
    return dict(subseed=req.first_subseed(), subseed_strength=req.subseed_strength,
                seed_resize_from=resize if min(resize) > 0 else None, tiling=req.tiling, randn_source=req.randn_source,
                eta_noise_seed_delta=(req.eta_noise_seed_delta or None) if uses_generators else None,
                sampler_fields=fields)


def _start(sd: StableDiffusion, req: GenerationRequest, run: _Run) -> _Start:
    """2. img2img and inpainting: the init image's latents, the sigmas its strength leaves, and the mask."""
    device = _device(sd)
    native_inpaint = sd.config.unet.in_channels == 9
    if req.init_image is None:
        return _Start(run.sigmas, concat=_paint_everything(sd, req.width, req.height, device) if native_inpaint else None)
    area = _masked_area(req) if req.mask is not None else None
    init = imgs.resize(req.init_image, req.width, req.height, req.resize_mode) if area is None else area.image
    fill = imgs.inpainting_fill(req.inpainting_fill) if area is not None else "original"
    if fill != "original":  # A1111 fills before encoding for every mode but "original"
        init = imgs.fill(init, area.latent_mask)
    latent_upscale = area is None and imgs.resize_mode(req.resize_mode) == imgs.RESIZE_MODES[3]
    if latent_upscale:  # encoded at its own size (in whole latents), its latents then resized bilinearly
        f = sd.config.vae.factor
        init = req.init_image.convert("RGB").resize((req.init_image.width // f * f, req.init_image.height // f * f))
    init_tensor = imgs.to_tensor(init).to(device)
    with torch.no_grad():
        init_latent = sd.vae.encode(init_tensor).mode() * sd.config.scale_factor
    if latent_upscale:
        init_latent = torch.nn.functional.interpolate(init_latent, size=run.latent_shape[1:], mode="bilinear")
    start = _Start(_last_part(run.sigmas, req.steps, req.strength), init_latent,
                   noise_multiplier=req.initial_noise_multiplier)
    if area is None:
        start.concat = _paint_everything(sd, req.width, req.height, device) if native_inpaint else None
        return start
    start.paste = (area.original, area.overlay, area.box)
    h, w = run.latent_shape[1:]
    # the latent mask: A1111 resizes it by PIL's default (bicubic) and rounds it unless mask_round is off
    latent_mask = imgs.mask_tensor(area.latent_mask, w, h, Image.BICUBIC).to(device)
    latent_mask = latent_mask.round() if req.mask_round else latent_mask
    if fill == "latent nothing":
        start.init_latent = init_latent * (1 - latent_mask)
    elif fill == "latent noise":
        start.noise_in = latent_mask
    if native_inpaint:
        start.concat = _inpainting_channels(sd, init_tensor, area.mask, req.mask_round, (h, w))
    start.keep = 1 - latent_mask  # (for inpainting models too, as A1111 blends them)
    return start


@dataclass
class _Area:
    """What inpainting draws and how the result goes back: the init image and masks at the drawing size, the
    original, the mask it is pasted through, and ("only masked") the box of the original it came from."""
    image: Image.Image
    mask: Image.Image                 # blurred, width x height
    latent_mask: Image.Image          # the mask for the latents and the fill: the request's latent_mask, else mask
    original: Image.Image
    overlay: Image.Image              # the mask the result is pasted over the original through
    box: tuple[int, int, int, int] | None = None


def _masked_area(req: GenerationRequest) -> _Area | None:
    """The mask made binary, inverted, blurred; then either the whole picture at width x height, or ("only
    masked") the mask's box with its padding, grown to the drawing's aspect ratio, cut out of the original and
    drawn at width x height (A1111's order of steps). An all-black mask with "only masked" is plain img2img."""
    w, h = req.width, req.height
    if req.inpaint_full_res:
        original = req.init_image.convert("RGB")
        mask = imgs.blur_mask(req.mask.resize(original.size) if req.mask.size != original.size else req.mask,
                              req.mask_blur, req.inpainting_mask_invert, req.mask_round)
        box = imgs.crop_region(mask, req.inpaint_full_res_padding)
        if box is None:
            return None
        box = imgs.expand_crop_region(box, w, h, *original.size)
        drawn = imgs.resize(mask.crop(box), w, h, "resize and fill").convert("L")
        return _Area(imgs.resize(original.crop(box), w, h, "resize and fill"), drawn, drawn, original, mask, box)
    image = imgs.resize(req.init_image, w, h, req.resize_mode)
    mask = imgs.prepare_mask(req.mask, w, h, req.mask_blur, req.inpainting_mask_invert, req.mask_round,
                             req.resize_mode)
    latent_mask = mask if req.latent_mask is None else req.latent_mask.convert("L").resize((w, h))
    overlay = mask.point(lambda v: min(2 * v, 255))  # A1111 pastes the whole picture through the mask doubled
    return _Area(image, mask, latent_mask, image, overlay)


def _inpainting_channels(sd: StableDiffusion, image: torch.Tensor, mask: Image.Image, round_mask: bool,
                         latent_size: tuple[int, int]) -> torch.Tensor:
    """An inpainting model's extra channels, as A1111 makes them: the mask (rounded unless mask_round is off)
    brought to the latent size by nearest neighbours, and the latents of the image (in [-1, 1]) times 1 - mask,
    the masked part mid grey."""
    full = imgs.mask_tensor(mask, image.shape[3], image.shape[2])
    full = full.round() if round_mask else full
    small = torch.nn.functional.interpolate(full, size=latent_size, mode="nearest")
    with torch.no_grad():
        masked_latent = sd.vae.encode(image * (1 - full.to(image.device))).mode() * sd.config.scale_factor
    return torch.cat([small.to(image.device), masked_latent], dim=1)


@dataclass
class Pass:
    """One run of a sampler over a stretch of sigmas: txt2img's or img2img's, or the hires fix's second."""
    sampler: S.SamplerInfo
    sigmas: torch.Tensor
    cond: Conditioning                # the prompt's text states by step, per AND part (one row for all images)
    uncond: ScheduledCond | None      # the negative prompt's; None: no guidance
    cfg_scale: float
    guidance_until: float
    unet: Callable                    # unet(x, t, context): the engine's, or fast mode's DeepCache around it
    token_merging: float              # this pass's token merging ratio
    options: dict = field(default_factory=dict)   # the sampler's eta and s_* (GenerationRequest.sampler_options)
    concat: torch.Tensor | None = None    # an inpainting model's extra input channels
    keep: tuple[torch.Tensor, torch.Tensor] | None = None  # (init latent, keep mask): inpainting
    upscale: tuple | None = None      # the hires fix: (upscaler, width, height, crop_x, crop_y, wrap, models) for _upscale
    guidance: float | None = None     # an LCM-distilled UNet's guidance scale (it then gets no uncond: _lcm_guidance)
    refiner: _RefinerPart | None = None   # the model that takes over during this pass (_refiner)
    min_uncond: float = 0.0           # A1111's NGMS (CFGDenoiser's min_uncond) ...
    skipped_uncond: bool = False      # ... and whether a call of the pass skipped the unconditional half for it


def _last_part(sigmas: torch.Tensor, steps: int, strength: float) -> torch.Tensor:
    """The sigmas img2img runs of a schedule of `steps`, as A1111 counts them: t_enc = int(steps * strength)
    (strength capped at 0.999) and t_enc + 1 steps from sigmas[steps - t_enc - 1], so strength 0 still runs the
    last step. (Counted from the steps asked for: a schedule may have a few more.)"""
    t_enc = int(min(strength, 0.999) * steps)
    return sigmas[steps - t_enc - 1:]


def _hires_sigmas(sd: StableDiffusion, sampler: S.SamplerInfo, steps: int, strength: float,
                  schedule: str) -> torch.Tensor:
    """The hires fix's second pass as A1111 runs it: all of its `steps`, at the end of a schedule stretched to
    int(steps / strength) steps (strength capped at 0.999), so that they cover the last `strength` of the noise;
    strength 0 runs none."""
    if strength <= 0:
        return S.schedule_sigmas(_denoiser(sd, sampler=sampler), sampler, steps, schedule)[-1:]
    total = int(steps / min(strength, 0.999))
    return S.schedule_sigmas(_denoiser(sd, sampler=sampler), sampler, total, schedule)[total - steps:]


def _first_pass(engine: Engine, req: GenerationRequest, params: Parameters, run: _Run, start: _Start,
                encode: _TextStates) -> Pass:
    """3. The first pass: the prompt's conditioning and what runs the UNet over the start's sigmas. The prompt's
    schedule is made for all the steps asked for, also when img2img runs only the last `strength` of them (its
    step 0 is then the first step it runs), as A1111 does."""
    cond, uncond = _conditioning(extract_loras(req.prompt)[0], req.negative_prompt, encode, params.steps,
                                 size=(params.width, params.height))
    keep = (start.init_latent, start.keep) if start.keep is not None else None
    guidance = _lcm_guidance(engine.sd, params.cfg_scale)
    return Pass(run.sampler, start.sigmas, cond, None if guidance is not None else uncond, params.cfg_scale,
                params.guidance_until, _unet(engine, run, params, start.sigmas, run.sampler), req.token_merging,
                req.sampler_options(run.sampler), start.concat, keep, guidance=guidance, min_uncond=req.s_min_uncond)


def _second_pass(engine: Engine, req: GenerationRequest, params: Parameters, run: _Run, first: Pass,
                 encode: _TextStates) -> Pass:
    """The hires fix's pass at the larger size: its steps over the last `strength` of the noise, its own prompt
    if any. Its prompt schedule is made for its own steps, numbers counting on from the first pass's (A1111's
    hires_steps)."""
    sd, hires = engine.sd, req.hires
    steps = hires.steps or params.steps
    sigmas = _hires_sigmas(sd, run.hires_sampler, steps, hires.strength, params.hires_schedule)
    prompt = extract_loras(hires.prompt or req.prompt)[0]  # (its LoRA tags are the first prompt's: request.py)
    negative = hires.negative_prompt or req.negative_prompt
    factor = sd.config.vae.factor
    final_w, final_h = hires.final_size(params.width, params.height, factor)
    cond, uncond = _conditioning(prompt, negative, encode, params.steps, steps, size=(final_w, final_h))
    concat = _paint_everything(sd, final_w, final_h, _device(sd)) if sd.config.unet.in_channels == 9 else None
    merging = req.token_merging if hires.token_merging is None else hires.token_merging
    guidance = _lcm_guidance(sd, params.cfg_scale)
    return Pass(run.hires_sampler, sigmas, cond, None if guidance is not None else uncond, params.cfg_scale,
                params.guidance_until, _unet(engine, run, params, sigmas, run.hires_sampler), merging,
                req.sampler_options(run.hires_sampler), concat,
                upscale=(hires.upscaler, *hires.target(params.width, params.height, factor), req.tiling,
                         (req.upscalers_dir, req.upscaler_tile, req.upscaler_tile_overlap)),
                guidance=guidance, min_uncond=req.s_min_uncond)


class _TextStates:
    """A run's text encoder: each distinct text encoded once (a schedule repeats texts, the hires pass reuses the
    first pass's), its states [1, tokens, width] shared by every image of the run.

    An SDXL model's conditioning is a dict, as A1111's: the "crossattn" states and the UNet's "vector" of pooled
    text and the numbers of models/sdxl.size_numbers for the pass's picture size (width, height); an empty
    negative prompt's states and pooled text are zeros (A1111's force_zero_embeddings, diffusers'
    force_zeros_for_empty_prompt), and the refiner's negative prompts get the low aesthetic score."""

    def __init__(self, sd: StableDiffusion, clip_skip: int | None, embeddings):
        self.sd, self.clip_skip, self.embeddings = sd, clip_skip, embeddings
        self.done: dict[str, torch.Tensor] = {}

    def __call__(self, text: str, negative: bool = False, size: tuple[int, int] | None = None):
        sd = self.sd
        if text not in self.done:
            encoded = encode_prompt(sd.tokenizer, sd.text_encoder, text, self.clip_skip, self.embeddings,
                                    pooled=bool(sd.config.sdxl))
            self.done[text] = tuple(t.to(_device(sd)) for t in encoded) if sd.config.sdxl else encoded.to(_device(sd))
        if not sd.config.sdxl:
            return self.done[text]
        states, pooled = self.done[text]
        if negative and text == "":
            states, pooled = torch.zeros_like(states), torch.zeros_like(pooled)
        numbers = size_numbers(sd.config.sdxl, *size, aesthetic_score=REFINER_SCORES[negative])
        return conditioning(states, pooled, torch.tensor([numbers], device=pooled.device))


# The refiner's aesthetic score for prompts and for negative prompts (A1111's sdxl_refiner_high_aesthetic_score and
# sdxl_refiner_low_aesthetic_score, diffusers' aesthetic_score and negative_aesthetic_score)
REFINER_SCORES = {False: 6.0, True: 2.5}


def _conditioning(prompt: str, negative: str, encode: _TextStates, steps: int, hires_steps: int | None = None,
                  size: tuple[int, int] | None = None):
    """The prompt's AND parts with their weights and the negative prompt (no AND, as in A1111), each a schedule of
    text states; where their lengths differ, the empty prompt's states pad the texts of each step to one length
    (CFGDenoiser), as the UNet takes them in one batch. size: the pass's picture (width, height), which SDXL's
    conditioning holds."""
    parts = [(weight, prompt_schedule(text, steps, hires_steps)) for text, weight in split_and(prompt)]
    negative_schedule = prompt_schedule(negative, steps, hires_steps)
    states = {text: encode(text, size=size) for _, schedule in parts for _, text in schedule}
    negatives = {text: encode(text, negative=True, size=size) for _, text in negative_schedule}
    tokens = {_crossattn(s).shape[1] for s in [*states.values(), *negatives.values()]}
    padding = _crossattn(encode("", size=size)) if len(tokens) > 1 else None

    def scheduled(schedule, encoded):
        return ScheduledCond([(end, encoded[text]) for end, text in schedule])

    cond = Conditioning([(weight, scheduled(schedule, states)) for weight, schedule in parts], padding)
    return cond, scheduled(negative_schedule, negatives)


def _crossattn(states):
    """The text states of a conditioning: the tensor itself, or SDXL's dict's crossattn."""
    return states["crossattn"] if isinstance(states, dict) else states


def _unet(engine: Engine, run: _Run, params: Parameters, sigmas: torch.Tensor, sampler: S.SamplerInfo) -> Callable:
    """What a pass calls as its UNet: fast mode's DeepCache around the eager UNet, else the engine's."""
    if params.deepcache is None:
        return engine.unet
    fast, steps_run, to_t = run.fast, len(sigmas) - 1, _denoiser(engine.sd, sampler=sampler).sigma_to_t
    # its parts (start, end, early, late) are fractions of this pass's steps, found at sampling time by their
    # noise level, so that any sampler's calls fall in the right part
    last, early, late = (round(f * steps_run) for f in (fast.deepcache_end, fast.deepcache_early, fast.deepcache_late))
    return DeepCacheUNet(engine.sd.unet, fast.deepcache_interval, fast.deepcache_depth,
                         warmup=round(fast.deepcache_start * steps_run),
                         whole_from_t=float(to_t(sigmas[steps_run - last])) if last else None,
                         early_depth=fast.deepcache_early_depth if early else None,
                         early_until_t=float(to_t(sigmas[early])) if early else None,
                         late_interval=fast.deepcache_late_interval if late else None,
                         late_from_t=float(to_t(sigmas[steps_run - late])) if late else None)


def _controlnet(engine: Engine, req: GenerationRequest, params: Parameters, start: _Start, first: Pass,
                second: Pass | None) -> list[list[Image.Image]]:
    """3b. ControlNet units (plainsd.control): their networks, each unit's picture through its preprocessor once,
    fitted to each pass's size, and each pass's UNet wrapped to add the active units' residuals. Sets their
    infotext entries; returns each unit's hint as each pass's UNet gets it (the extension's detected maps)."""
    nets = control_mod.load_controlnets(engine, req.controlnet, req.controlnet_dir)
    maps = [control_mod.detected_map(unit, req, start.paste[2] if start.paste else None) for unit in req.controlnet]
    shown = [[] for _ in req.controlnet]
    sizes = [(first, (req.width, req.height), False)]
    if second is not None:
        sizes.append((second, req.hires.final_size(req.width, req.height, engine.sd.config.vae.factor), True))
    for p, (width, height), hires in sizes:
        hints = [control_mod.hint_tensor(detected, width, height, resize) for detected, resize in maps]
        units = control_mod.active_units(req.controlnet, nets, hints, hires)
        to_t = _denoiser(engine.sd, sampler=p.sampler).sigma_to_t
        p.unet = control_mod.ControlledUNet(p.unet, units, to_t(p.sigmas[:-1]), req.batch_size, len(p.cond.parts),
                                            lazy=isinstance(p.unet, DeepCacheUNet))
        for unit_maps, hint in zip(shown, hints):
            unit_maps.append(control_mod.hint_image(hint))
    params.controlnet = control_mod.infotext_fields(req.controlnet, req.controlnet_dir)
    return shown


def _run_batch(engine: Engine, run: _Run, start: _Start, first: Pass, second: Pass | None, seeds: list[int],
               subseeds: list[int], hooks: _Hooks):
    """4. One batch: its noise from its seeds (and variation seeds), the first pass, and the hires fix's pass on
    the upscaled result."""
    device = _device(engine.sd)
    _resident(engine, engine.sd.unet)  # (the batch before ended with the refiner's steps)
    noise, generators = run.noise.draw(run.latent_shape, seeds, subseeds)
    noise = noise.to(device)
    if start.init_latent is not None:
        x0 = start.init_latent.repeat(len(seeds), 1, 1, 1)
        if start.noise_in is not None:  # "latent noise": the image's seed's noise alone in the mask (no variation
            # seed, no seed resize), as A1111 draws it; A1111 reuses the first batch's seeds for later batches, a
            # slip plainsd does not copy
            alone = ImageNoise(source=run.noise.source)
            fill = noise if run.noise == alone else alone.draw(run.latent_shape, seeds)[0].to(device)
            x0 = x0 * (1 - start.noise_in) + fill * start.noise_in
        x = x0 + noise * start.noise_multiplier * first.sigmas[0]
    else:
        x = x0 = noise * first.sigmas[0]
    latents, finished = _sample(engine.sd, first, x, x0, generators, seeds, hooks)
    if second is None or not finished:
        return latents
    up = _upscale(engine.sd, latents, *second.upscale)
    noise, generators = run.noise.draw(tuple(up.shape[1:]), seeds, subseeds)  # the same seeds, the larger noise
    x = up + noise.to(device) * second.sigmas[0]
    hooks.offset = len(first.sigmas) - 1
    return _sample(engine.sd, second, x, up, generators, seeds, hooks)[0]


class _Hooks:
    """A run's step callback, interrupt and skip checks, progress bar and recorded frames."""

    def __init__(self, callback, interrupt, skip, progress: bool, record_steps: bool, total: int):
        self.callback, self.interrupt, self.skip = callback, interrupt, skip
        self.progress, self.record_steps, self.total = progress, record_steps, total
        self.batch = self.offset = 0
        self.frames: list[tuple[torch.Tensor, float]] = []
        self.interrupted = False
        self.denoised: torch.Tensor | None = None  # the estimate the sampler has reached

    def for_batch(self, batch: int) -> _Hooks:
        self.batch, self.offset, self.frames = batch, 0, []
        return self

    def __call__(self, d: dict) -> None:
        """The sampler's callback after each step."""
        self.denoised = d["denoised"]
        if self.record_steps:
            self.frames.append((d["x"].detach().clone(), float(d["sigma"])))
        if self.callback is not None:
            self.callback(StepInfo(self.offset + d["i"], self.total, self.batch, d["x"], d["denoised"],
                                   float(d["sigma"])))
        if self.interrupt is not None and self.interrupt():
            raise Interrupted()
        if self.skip is not None and self.skip():
            raise _Skipped()


def _sample(sd: StableDiffusion, p: Pass, x: torch.Tensor, start: torch.Tensor, generators, seeds,
            hooks: _Hooks) -> tuple[torch.Tensor, bool]:
    """A pass's latents and True; where the run was interrupted or skipped, the estimate it had reached and
    False."""
    if isinstance(p.unet, (DeepCacheUNet, control_mod.ControlledUNet)):
        p.unet.reset()  # each pass of each batch starts with a whole UNet pass (DeepCache's)
    denoiser = _denoiser(sd, _net(p.unet, p.concat, p.guidance), p.sampler)
    guided = [CFGDenoiser(denoiser, p.cfg_scale, p.sigmas, p.guidance_until, p.min_uncond)]
    model = guided[0]
    if p.refiner is not None:
        model = _handover(sd, p, model)
        guided.append(model.refined)
    if p.keep is not None:
        model = _KeepUnmasked(model, *p.keep)
    hooks.denoised = start
    refiner = p.refiner.engine.sd if p.refiner is not None else None
    try:
        with _token_merging(sd, p.token_merging), _token_merging(refiner, p.token_merging):
            if len(p.sigmas) > 1:
                return _run_sampler(p, model, x, hooks, generators, seeds), True
            return x, True
    except Interrupted:
        hooks.interrupted = True
    except _Skipped:
        pass
    finally:
        p.skipped_uncond = p.skipped_uncond or any(g.skipped for g in guided)
    return hooks.denoised, False


_BROWNIAN = (S.sample_dpmpp_sde, S.sample_dpmpp_2m_sde, S.sample_dpmpp_3m_sde)  # their noise: a Brownian tree


def _uses_generators(info: S.SamplerInfo, options: dict) -> bool:
    """Whether a sampler with these options adds noise from the images' generators (what ENSD changes)."""
    return (S.takes(info, "noise_sampler") and info.function not in _BROWNIAN
            and (info.stochastic or options.get("s_churn", 0) > 0))


def _run_sampler(p: Pass, model, x, hooks: _Hooks, generators, seeds):
    """The sampler function with the arguments its kind takes: eta and s_* (p.options), a noise sampler that
    continues each image's own generator (or a Brownian tree from the seeds), DPM fast / adaptive's sigma range."""
    info, sigmas = p.sampler, p.sigmas
    opts, fn = {**dict(info.options), **p.options}, info.function
    extra = {"cond": p.cond, "uncond": p.uncond}
    if S.takes(info, "noise_sampler"):  # (Euler, Heun, DPM2 too: their churn's noise)
        if fn in _BROWNIAN:
            opts["noise_sampler"] = S.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seeds)
        else:
            ns = S.NoiseSampler(x)
            ns.generators = generators
            opts["noise_sampler"] = ns
    common = dict(extra_args=extra, callback=hooks, disable=not hooks.progress)
    if fn is S.sample_dpm_fast:
        return fn(model, x, float(sigmas[-2]), float(sigmas[0]), len(sigmas) - 1, **common, **opts)
    if fn is S.sample_dpm_adaptive:
        return fn(model, x, float(sigmas[-2]), float(sigmas[0]), **common, **opts)
    return fn(model, x, sigmas, **common, **opts)


def _net(unet: Callable, concat: torch.Tensor | None, guidance: float | None = None):
    """The UNet as the denoiser's network: (x, t, cond) -> prediction; inpainting models get their extra channels,
    LCM-distilled ones their guidance scale, SDXL ones their conditioning's vector (cond a dict: _TextStates)."""

    def net(x, t, cond):
        if concat is not None:
            x = torch.cat([x, concat.repeat(x.shape[0] // concat.shape[0], 1, 1, 1).to(x.dtype)], dim=1)
        extra = {"guidance": guidance} if guidance is not None else {}
        if isinstance(cond, dict):
            cond, extra["y"] = cond["crossattn"], cond["vector"]
        return unet(x, t, cond, **extra)

    return net


# --- A1111's refiner ------------------------------------------------------------------------------------

@dataclass
class _RefinerPart:
    """A1111's refiner in a pass: the model that takes the latents over, its conditioning of the pass's prompts,
    at which fraction of the denoising, its name for the infotext; took_over: whether it has, in this batch."""
    engine: Engine
    cond: Conditioning
    uncond: ScheduledCond
    switch_at: float
    title: str
    base: Engine                      # the base model's engine (whose UNet makes way: _resident)
    took_over: bool = False


def _load_refiner(engine: Engine, req: GenerationRequest) -> Engine:
    """The request's refiner, loaded (_refiner_engine) where the base model can hand over to one."""
    if _embeds_guidance(engine.sd):
        raise ValueError(f"{engine.sd.name} is LCM-distilled and runs no classifier-free guidance; a refiner does "
                         "not take over from it")
    return _refiner_engine(engine, req.refiner_checkpoint)


def _refiner(engine: Engine, req: GenerationRequest, params: Parameters, hires: bool) -> _RefinerPart:
    """3c. The refiner (A1111's refiner_checkpoint) for the last pass: loaded (kept on the engine for the next
    run), checked against the base model's latents, and its own conditioning of the pass's prompts and size."""
    sd = engine.sd
    refiner = _load_refiner(engine, req).sd
    latents = lambda m: (m.config.vae.z_channels, m.config.vae.factor, m.config.scale_factor)  # noqa: E731
    if latents(refiner) != latents(sd):
        raise ValueError(f"the refiner {refiner.name} works on other latents than {sd.name} (channels, factor, scale "
                         f"{latents(refiner)} against {latents(sd)}); choose a refiner of the same family")
    if refiner.config.unet.in_channels != refiner.config.vae.z_channels or _embeds_guidance(refiner):
        raise ValueError(f"the refiner {refiner.name} is an inpainting or LCM-distilled model; a refiner must be a "
                         "plain text-to-image model")
    # its towers back for the encoding, in place of the base's (written out again when the steps begin)
    _keep(engine, [sd.unet, sd.vae, *refiner.text_towers])
    embeddings = load_embeddings(req.embeddings_dir, refiner) if req.embeddings_dir is not None else None
    encode = _TextStates(refiner, req.clip_skip, embeddings)
    if hires:
        size = req.hires.final_size(params.width, params.height, sd.config.vae.factor)
        cond, uncond = _conditioning(extract_loras(req.hires.prompt or req.prompt)[0],
                                     req.hires.negative_prompt or req.negative_prompt, encode, params.steps,
                                     req.hires.steps or params.steps, size=size)
    else:
        cond, uncond = _conditioning(extract_loras(req.prompt)[0], req.negative_prompt, encode, params.steps,
                                     size=(params.width, params.height))
    title = refiner.name + (f" [{refiner.hash}]" if refiner.hash else "")
    switch = 0.8 if req.refiner_switch_at is None else req.refiner_switch_at
    return _RefinerPart(engine.refiner[1], cond, uncond, switch, title, engine)


def _refiner_engine(engine: Engine, path: str) -> Engine:
    """The refiner checkpoint as an Engine, kept on the base's engine for later runs: loaded in the dtype the base
    model's weights came in (bf16, fp16 storage or float32) and, where the base engine was made by runtime.prepare,
    prepared the same way (eager: the refiner's UNet is not compiled by OpenVINO). Its VAE and text tower are the
    base model's own modules where their weights are equal (weights.load's share_with: SDXL's refiner file holds the
    base's bigG and VAE, which diffusers' documentation shares the same way), not second copies: compared with the
    base's own weights, without the LoRAs of the run before (lora.use). With one UNet at a time (_one_unet), the
    base's UNet is written out before the refiner is read, and its other parts that the refiner does not share before
    the refiner is prepared; the base comes back whole after (_resident)."""
    path = str(Path(path).resolve())
    if engine.refiner is None or engine.refiner[0] != path:
        engine.refiner = None  # (the one before freed first)
        lora_mod.use(engine.sd, [])
        if _one_unet(engine):
            offload(engine.sd.unet)
        refiner = load(path, dtype=engine.load_dtype, share_with=engine.sd)
        if _one_unet(engine):  # (the base's parts it does not share make way while it is readied)
            for part in _whole(engine.sd):
                if not any(part is mine for mine in _whole(refiner)):
                    offload(part)
        engine.refiner = (path, prepare(refiner) if engine.prepared else Engine(refiner))
        _resident(engine, engine.sd.unet)
    _refiner_vae(engine, engine.refiner[1], path)
    return engine.refiner[1]


def _refiner_vae(engine: Engine, refiner: Engine, path: str) -> None:
    """The refiner decodes with the VAE A1111's sd_vae setting gives its checkpoint (engine.vae_for), as A1111
    loads that VAE with the refiner: a file read when the setting's choice changes, the base's module where the
    base decodes with the same file, else the refiner's own VAE."""
    file = engine.vae_for(path) if engine.vae_for is not None else None
    if file is not None and getattr(refiner.sd.vae, "path", None) == Path(file):
        return
    if file is None:
        refiner.use_vae(None)
    elif getattr(engine.sd.vae, "path", None) == Path(file):
        refiner.use_vae(engine.sd.vae)
    else:
        refiner.use_vae(load_vae(file, dtype=refiner.sd.dtype))


def _one_unet(engine: Engine) -> bool:
    """Whether the engine keeps one UNet in memory at a time (A1111's sd_checkpoints_limit of 1, its default:
    engine.checkpoints_limit): on the eager path, where the UNet's weights are the module's own (OpenVINO's
    compiled UNet holds a copy)."""
    return engine.checkpoints_limit < 2 and engine.backend == "eager"


def _resident(engine: Engine, unet: torch.nn.Module) -> None:
    """Make this UNet (the base's or the refiner's) the one whose weights are in memory, with what its steps use
    beside it (_used_with), where the engine keeps one UNet at a time (_one_unet): every other network of the two
    models is written out (runtime/offloading.py)."""
    _keep(engine, _used_with(engine, unet))


def _used_with(engine: Engine, unet: torch.nn.Module) -> list[torch.nn.Module]:
    """What a refiner run's steps use: in the base's, the base model whole; in the refiner's, its UNet and the VAE
    that decodes their latents (both models' prompts are encoded before the steps: _refiner)."""
    refiner = engine.refiner[1].sd if engine.refiner is not None else None
    if refiner is None or unet is not refiner.unet:
        return _whole(engine.sd)
    return [unet, refiner.vae]


def _whole(sd: StableDiffusion) -> list[torch.nn.Module]:
    return [sd.unet, *sd.text_towers, sd.vae]


def _keep(engine: Engine, used: list[torch.nn.Module]) -> None:
    """These networks in memory; where the engine has a refiner and keeps one UNet at a time, every other network
    of the base and the refiner written out."""
    if engine.refiner is not None and _one_unet(engine):
        for part in _whole(engine.sd) + _whole(engine.refiner[1].sd):
            if not any(part is u for u in used):
                offload(part)
    for part in used:
        restore(part)  # (also where a refiner failed to load, or the engine keeps both now)


def _refiner_loras(engine: Engine, refiner: Engine | None, loras: list) -> list[str]:
    """The prompt's LoRAs on the refiner as well, as A1111's stay on when its refiner takes over: each LoRA layer that
    fits the refiner (lora.fitting: a layer of that name and shape; its bigG tower takes the lora_te2_ layers, as
    diffusers' text_encoder_2 does), kept on as the base's are (lora.use). A part the refiner shares with the base
    (_refiner_engine) has the base's LoRA already. Each LoRA's fitting part is kept for the next run (_FITTED), so
    a run with the LoRAs of the run before reads no refiner weights here. Returns the notes for the run: one
    sentence per LoRA with layers that do not fit (A1111 counts them as "Networks with errors")."""
    if refiner is None or not (loras or lora_mod.carries(refiner.sd)):
        return []
    base = {id(m) for m in engine.sd.modules()}
    known, fits = _FITTED.get(refiner.sd, {}), {}
    for lora, _ in loras:
        fit = known.get(id(lora))
        if fit is None or fit[0] is not lora:
            _keep(engine, _whole(refiner.sd))  # (its layers' shapes; the base's steps come first: back below)
            fit = (lora, *lora_mod.fitting(refiner.sd, lora, shared=lambda module: id(module) in base))
        fits[id(lora)] = fit
    _FITTED[refiner.sd] = fits  # (this run's only: a LoRA left out of a prompt is fitted again when it is back)
    fitted = [(fits[id(lora)][1], weight) for lora, weight in loras]
    if not lora_mod.wears(refiner.sd, fitted):
        _keep(engine, _whole(refiner.sd))
        lora_mod.use(refiner.sd, fitted)
    _resident(engine, engine.sd.unet)
    return [f"{fits[id(lora)][2]} of the {len(lora.layers)} layers of LoRA {lora.name} have no layer of that name and "
            f"shape in the refiner {refiner.sd.name}, so they act in the base model's steps only"
            for lora, weight in loras if fits[id(lora)][2] and weight]


# refiner model -> {id(LoRA): (the LoRA, the part of it that fits the refiner, the count of its layers that do not)}
_FITTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _handover(sd: StableDiffusion, p: Pass, base: CFGDenoiser) -> _Handover:
    """The pass's guided denoiser with the refiner's beside it, for a new batch (not taken over yet); in fast mode
    the refiner's UNet runs under DeepCache's schedule too (a cache of its own)."""
    part = p.refiner
    part.took_over = False
    refiner = part.engine
    cache = p.unet.unet if isinstance(p.unet, control_mod.ControlledUNet) else p.unet
    unet = cache.around(refiner.sd.unet) if isinstance(cache, DeepCacheUNet) else refiner.unet  # (fast mode's)
    refined = CFGDenoiser(_denoiser(refiner.sd, _net(unet, None), p.sampler), p.cfg_scale, p.sigmas, p.guidance_until,
                          p.min_uncond)
    return _Handover(base, refined, part, _denoiser(sd, sampler=p.sampler).sigmas)


class _Handover:
    """A1111's refiner switch: calls go to the base model's guided denoiser until A1111's completed ratio, (999 -
    the training timestep nearest the call's sigma) / 1000, reaches switch_at; from then on (for the rest of the
    batch's pass) to the refiner's, with the refiner's conditioning. The sampler runs on, its state kept."""

    def __init__(self, base, refined, part: _RefinerPart, table: torch.Tensor):
        self.base, self.refined, self.part, self.table = base, refined, part, table

    def __call__(self, x, sigma, **extra):
        if not self.part.took_over:
            timestep = int(torch.argmin((self.table - float(torch.as_tensor(sigma).max())).abs()))
            self.part.took_over = (999 - timestep) / 1000 >= self.part.switch_at
            if self.part.took_over:
                _resident(self.part.base, self.part.engine.sd.unet)
                self.refined.calls = self.base.calls  # (A1111 counts the calls of the pass on)
        if self.part.took_over:
            return self.refined(x, sigma, **{**extra, "cond": self.part.cond, "uncond": self.part.uncond})
        return self.base(x, sigma, **extra)


def _paste(picture: Image.Image, original: Image.Image, mask: Image.Image, box: tuple | None) -> Image.Image:
    """The drawn picture over the original through the blurred mask; "only masked" first puts it back into its box
    (resized to the box, cropped to fill it), so the result has the original's size."""
    if box is not None:
        x1, y1, x2, y2 = box
        canvas = original.copy()
        canvas.paste(imgs.resize(picture, x2 - x1, y2 - y1, "crop and resize"), (x1, y1))
        picture = canvas
    return Image.composite(picture, original, mask)


class _KeepUnmasked:
    """Inpainting: outside the mask, the estimate is the original latent (A1111's blend after each step)."""

    def __init__(self, inner, init_latent: torch.Tensor, keep: torch.Tensor):
        self.inner, self.init, self.keep = inner, init_latent, keep

    def __call__(self, x, sigma, **extra):
        denoised = self.inner(x, sigma, **extra)
        return self.init * self.keep + denoised * (1 - self.keep)


@contextlib.contextmanager
def _token_merging(sd: StableDiffusion | None, ratio: float):
    """The UNet merges `ratio` of its full-resolution tokens for this pass (0: none), as it did before afterwards.
    (No model: nothing to do.)"""
    if sd is None:
        yield
        return
    before = {m: m.merge_ratio for m in sd.unet.modules() if hasattr(m, "merge_ratio")}
    sd.unet.set_token_merging(ratio)
    try:
        yield
    finally:
        for module, value in before.items():
            module.merge_ratio = value


@contextlib.contextmanager
def _tiling(engine: Engine, on: bool, refiner: Engine | None = None):
    """A1111's tiling: for the run, every padded convolution of the UNet and the VAE (and the tiny decoder; a
    refiner's UNet and VAE) pads circularly, so that the picture's left edge continues its right and its top its
    bottom; as before afterwards, also after an error. (Packed convolutions honour it: runtime/packing.py.)"""
    networks = [engine.sd.unet, engine.sd.vae] + ([engine.tiny_decoder] if engine.tiny_decoder is not None else [])
    networks += [refiner.sd.unet, refiner.sd.vae] if refiner is not None else []
    convs = [m for net in networks for m in net.modules()
             if on and isinstance(m, torch.nn.Conv2d) and any(m._reversed_padding_repeated_twice)]
    before = [m.padding_mode for m in convs]
    try:
        for m in convs:
            m.padding_mode = "circular"
        yield
    finally:
        for m, mode in zip(convs, before):
            m.padding_mode = mode


def _paint_everything(sd: StableDiffusion, width: int, height: int, device) -> torch.Tensor:
    """An inpainting model's extra channels when there is no mask: all to be painted, over a grey image (as A1111)."""
    with torch.no_grad():
        grey = sd.vae.encode(torch.zeros(1, 3, height, width, device=device)).mode() * sd.config.scale_factor
    return torch.cat([torch.ones_like(grey[:, :1]), grey], dim=1)


def _upscale(sd: StableDiffusion, latents: torch.Tensor, upscaler: str, width: int, height: int, crop_x: int,
             crop_y: int, wrap: bool = False, models: tuple = (None, 192, 8)) -> torch.Tensor:
    """Hires. fix's upscaling to width x height (rounded down to whole latents), then crop_x / crop_y latent
    columns / rows cut off, half on each side (the larger half at the end), as A1111 does. wrap: tiling's
    decode, for an image upscaler. models: (upscalers folder, tile, tile overlap) for an upscaler model, which
    upscales the decoded picture as A1111's resize_image does (upscale.resize), in bf16 where the UNet runs in it."""
    f = sd.config.vae.factor
    rows, cols = height // f, width // f
    if upscaler in LATENT_UPSCALERS:
        mode, antialias = LATENT_UPSCALERS[upscaler]
        up = torch.nn.functional.interpolate(latents.float(), size=(rows, cols), mode=mode, antialias=antialias)
    else:
        folder, tile, overlap = models
        precision = "bf16" if sd.unet.dtype == torch.bfloat16 else "fp32"

        def resized(p: Image.Image) -> Image.Image:
            if upscaler in IMAGE_UPSCALERS:
                return p.resize((cols * f, rows * f), IMAGE_UPSCALERS[upscaler])
            return upscale_mod.resize(p, cols * f, rows * f, upscaler, folder, tile=tile, tile_overlap=overlap,
                                      precision=precision)
        with torch.no_grad():
            up = torch.cat([sd.vae.encode(imgs.to_tensor(resized(p)).to(latents.device)).mode().float()
                            for p in decode(sd, latents, wrap=wrap)])
        up = up * sd.config.scale_factor
    return up[:, :, crop_y // 2:rows - (crop_y + 1) // 2, crop_x // 2:cols - (crop_x + 1) // 2]


DECODE_TILE = 64  # latents; larger latents (images over 512 px on a side) are decoded by overlapping tiles


def decode(sd: StableDiffusion, latents: torch.Tensor, tiny=None, wrap: bool = False) -> list[Image.Image]:
    """5. Scaled latents -> PIL images, by the VAE (by tiles when large) or by a tiny (TAESD) decoder. wrap: the
    picture is seamless (tiling), so large latents are decoded by tiles that see across the edges."""
    release_freed_memory()  # (the sampling's freed memory, before the decoder's large blocks)
    with torch.no_grad():
        if tiny is not None:
            return imgs.to_pil(tiny.decode(latents))
        return imgs.to_pil(sd.vae.decode_tiled(latents / sd.config.scale_factor, DECODE_TILE, DECODE_TILE // 4, wrap))


def _tiny_decoder(engine: Engine):
    """Fast mode's tiny decoder: the engine's, else the file beside the checkpoint (kept by the engine)."""
    path = engine.sd.tiny_decoder_path
    if engine.tiny_decoder is None and path:
        engine.use_tiny_decoder(load_tiny_decoder(path, engine.sd.vae.dtype), Path(path).name)
    if engine.tiny_decoder is None:
        raise ValueError("this model has no tiny decoder: put a TAESD decoder file beside the checkpoint as "
                         "NAME.taesd.safetensors (taesd_decoder.safetensors in a diffusers folder), or on the command "
                         "line name the file with --tiny-decoder FILE")
    return engine.tiny_decoder


def _denoiser(sd: StableDiffusion, net: Callable | None = None, sampler: S.SamplerInfo | None = None) -> DiscreteDenoiser:
    """The model as a denoiser for this sampler: on the LCM distillation timesteps for LCM (as A1111's), else on
    all the training timesteps. Its sigma_to_t is the timestep the UNet is called with."""
    if sampler is not None and sampler.function is S.sample_lcm:
        return LCMDenoiser(net, sd.config.prediction)
    return DiscreteDenoiser(net, sd.config.prediction)


def _device(sd: StableDiffusion) -> torch.device:
    return next(sd.unet.parameters()).device
