"""txt2img, img2img and inpainting: the one place where the networks and the samplers meet.

    result = txt2img(sd, "a red circle", steps=20, sampler="DPM++ 2M", seed=1)
    result.images[0].save("out.png")

A run goes through named stages (generate): settings (the model's recommendations filled in, the request
checked) -> start (an init image's latents and a mask) -> passes with their conditioning (a Pass is one run of a
sampler; the hires fix is a second Pass at the larger size) -> each batch's noise through the passes -> decode
-> infotext.

Seeds: image i of a run gets seed + i, and its noise (the initial latents and any noise a sampler adds
later) comes from its own generator, so an image is the same whether it was made alone or in a batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from . import images as imgs
from . import lora as lora_mod
from .diffusion import samplers as S
from .diffusion.denoisers import DiscreteDenoiser
from .diffusion.guidance import CFGDenoiser, Conditioning, ScheduledCond
from .embeddings import load_embeddings
from .fast import FAST, DeepCacheUNet, FastSettings
from .models import StableDiffusion
from .prompts import encode_prompt, extract_loras, prompt_schedule, split_and
from .request import (DEFAULTS, IMAGE_UPSCALERS, LATENT_UPSCALERS, MAX_SEED, GenerationRequest, HiresFix,
                      Parameters)
from .runtime import Engine, release_freed_memory
from .weights import load_tiny_decoder

__all__ = ["txt2img", "img2img", "inpaint", "generate", "GenerationRequest", "HiresFix", "Parameters", "Result",
           "StepInfo", "Interrupted", "recommended", "decode", "DEFAULTS", "LATENT_UPSCALERS", "IMAGE_UPSCALERS",
           "MAX_SEED"]


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
    """Repaint the white part of the mask. 9-channel inpainting models do it natively; other models by
    keeping the original latents outside the mask at every step. The result is pasted over the original
    through the blurred mask, so the unmasked part stays exactly as it was."""
    return _call(sd, prompt, negative_prompt, dict(kwargs, init_image=init_image, mask=mask, strength=strength,
                                                   mask_blur=mask_blur, inpainting_mask_invert=inpainting_mask_invert))


_CONTROLS = ("callback", "interrupt", "skip", "progress", "record_steps")


def _call(sd, prompt: str, negative_prompt: str, kwargs: dict) -> Result:
    controls = {k: kwargs.pop(k) for k in _CONTROLS if k in kwargs}
    fast = kwargs.pop("fast", None)
    request = GenerationRequest(prompt=prompt, negative_prompt=negative_prompt,
                                fast=FAST if fast is True else (fast or None), **kwargs)
    return generate(sd, request, **controls)


def recommended(sd: StableDiffusion | Engine) -> dict:
    """The settings a request that leaves them out gets: the model's own recommendations (sd.defaults), then
    DEFAULTS."""
    return {**DEFAULTS, **(sd.sd if isinstance(sd, Engine) else sd).defaults}


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
    request, params, run = _settings(engine, request)
    start = _start(sd, request, run)
    loras = lora_mod.resolve(extract_loras(request.prompt)[1], request.lora_dir)
    embeddings = load_embeddings(request.embeddings_dir, sd) if request.embeddings_dir is not None else None
    encode = _TextStates(sd, request.clip_skip, embeddings)
    with lora_mod.applied(sd, loras):
        first = _first_pass(engine, request, params, run, start, encode)
        second = _second_pass(engine, request, params, run, first, encode) if request.hires else None
        hooks = _Hooks(callback, interrupt, skip, progress, record_steps,
                       total=len(first.sigmas) - 1 + (len(second.sigmas) - 1 if second else 0))
        result = Result([], [], [], params)
        for batch in range(request.batch_count):
            seeds = [params.seed + batch * request.batch_size + i for i in range(request.batch_size)]
            latents = _run_batch(engine, run, start, first, second, seeds, hooks.for_batch(batch))
            pictures = decode(sd, latents, run.tiny)
            if start.paste is not None:
                original, mask = start.paste
                pictures = [Image.composite(p, original, mask) for p in pictures]
            if record_steps:
                decoded = [decode(sd, f / (1 + s**2) ** 0.5, run.tiny) for f, s in hooks.frames] + [pictures]
                result.frames.extend([[step[i] for step in decoded] for i in range(request.batch_size)])
            result.images += pictures
            result.seeds += seeds
            result.infotexts += [params.infotext(s) for s in seeds]
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


@dataclass
class _Start:
    """What the first pass starts from: all noise (txt2img), or an init image's latents noised to its strength."""
    sigmas: torch.Tensor              # the first pass's (img2img: the last `strength` of the schedule)
    init_latent: torch.Tensor | None = None
    keep: torch.Tensor | None = None  # inpainting with an ordinary model: 1 where the original latent stays
    concat: torch.Tensor | None = None    # an inpainting model's extra input channels
    paste: tuple[Image.Image, Image.Image] | None = None  # (the resized original, the blurred mask)


def _settings(engine: Engine, req: GenerationRequest) -> tuple[GenerationRequest, Parameters, _Run]:
    """1. The request with the model's recommendations filled in, what the run will use, the sampler and its
    sigmas."""
    sd = engine.sd
    chosen = recommended(sd)
    steps = chosen["steps"] if req.steps is None else req.steps
    init = req.init_image
    width = req.width or (init.width // 8 * 8 if init is not None else chosen.get("width", sd.config.resolution))
    height = req.height or (init.height // 8 * 8 if init is not None else chosen.get("height", sd.config.resolution))
    req = req.replace(steps=steps, width=width, height=height,
                      sampler=chosen["sampler"] if req.sampler is None else req.sampler,
                      schedule=chosen["schedule"] if req.schedule is None else req.schedule,
                      cfg_scale=chosen["cfg_scale"] if req.cfg_scale is None else req.cfg_scale,
                      guidance_until=chosen["guidance_until"] if req.guidance_until is None else req.guidance_until)
    req.check(sd.config.vae.factor, engine.backend)
    info, schedule = S.resolve_sampler(req.sampler, req.schedule)
    fast = req.fast
    guidance_until = min(req.guidance_until, fast.guidance_until) if fast is not None else req.guidance_until
    deepcache = fast is not None and fast.deepcache_interval > 1 and engine.backend == "eager"
    tiny = _tiny_decoder(engine) if fast is not None and fast.tiny_decoder else None
    hires = req.hires
    hr_info, hr_schedule = hires.resolve(req.sampler, req.schedule) if hires else (None, None)
    params = Parameters(
        prompt=req.prompt, negative_prompt=req.negative_prompt, steps=steps, sampler=info.name, schedule=schedule,
        cfg_scale=req.cfg_scale, guidance_until=guidance_until, seed=req.first_seed(), width=width, height=height,
        batch_size=req.batch_size, batch_count=req.batch_count, clip_skip=req.clip_skip or sd.config.text.clip_skip,
        denoising_strength=req.strength if init is not None else (hires.strength if hires else None),
        model=sd.name, model_hash=sd.hash,
        deepcache=fast.deepcache_interval if deepcache else None, tiny_decoder=tiny is not None,
        token_merging=req.token_merging or None, hires=hires,
        hires_sampler=hr_info.name if hires else None, hires_schedule=hr_schedule)
    factor = sd.config.vae.factor
    run = _Run(info, _denoiser(sd).get_sigmas(steps, schedule), hr_info,
               (sd.config.vae.z_channels, height // factor, width // factor), fast, tiny)
    return req, params, run


def _start(sd: StableDiffusion, req: GenerationRequest, run: _Run) -> _Start:
    """2. img2img and inpainting: the init image's latents, the sigmas its strength leaves, and the mask."""
    device = _device(sd)
    native_inpaint = sd.config.unet.in_channels == 9
    if req.init_image is None:
        return _Start(run.sigmas, concat=_paint_everything(sd, req.width, req.height, device) if native_inpaint else None)
    init = imgs.resize(req.init_image, req.width, req.height, req.resize_mode)
    with torch.no_grad():
        init_latent = sd.vae.encode(imgs.to_tensor(init).to(device)).mode() * sd.config.scale_factor
    start = _Start(_last_part(run.sigmas, req.steps, req.strength), init_latent)
    if req.mask is None:
        start.concat = _paint_everything(sd, req.width, req.height, device) if native_inpaint else None
        return start
    m = imgs.prepare_mask(req.mask, req.width, req.height, req.mask_blur, req.inpainting_mask_invert)
    start.paste = (init, m)
    latent_mask = imgs.mask_tensor(m, run.latent_shape[2], run.latent_shape[1]).to(device).round()
    if not native_inpaint:
        start.keep = 1 - latent_mask
        return start
    with torch.no_grad():
        masked = imgs.to_tensor(init).to(device) * (imgs.mask_tensor(m, req.width, req.height).to(device) < 0.5)
        masked_latent = sd.vae.encode(masked).mode() * sd.config.scale_factor
    start.concat = torch.cat([latent_mask, masked_latent], dim=1)
    return start


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
    eta: float | None = None
    concat: torch.Tensor | None = None    # an inpainting model's extra input channels
    keep: tuple[torch.Tensor, torch.Tensor] | None = None  # (init latent, keep mask): inpainting, ordinary model
    upscale: tuple | None = None      # the hires fix: (upscaler, width, height, crop_x, crop_y) for _upscale


def _last_part(sigmas: torch.Tensor, steps: int, strength: float) -> torch.Tensor:
    """The sigmas an img2img strength leaves of a schedule of `steps`: from int(steps * strength) steps before
    the end (none: just the final 0). (Counted from the steps asked for: a schedule may have a few more.)"""
    run = int(steps * strength)
    return sigmas[steps - run:] if run > 0 else sigmas[-1:]


def _first_pass(engine: Engine, req: GenerationRequest, params: Parameters, run: _Run, start: _Start,
                encode: _TextStates) -> Pass:
    """3. The first pass: the prompt's conditioning and what runs the UNet over the start's sigmas. The prompt's
    schedule is made for all the steps asked for, also when img2img runs only the last `strength` of them (its
    step 0 is then the first step it runs), as A1111 does."""
    cond, uncond = _conditioning(extract_loras(req.prompt)[0], req.negative_prompt, encode, params.steps)
    keep = (start.init_latent, start.keep) if start.keep is not None else None
    return Pass(run.sampler, start.sigmas, cond, uncond, params.cfg_scale,
                params.guidance_until, _unet(engine, run, params, start.sigmas), req.token_merging, req.eta,
                start.concat, keep)


def _second_pass(engine: Engine, req: GenerationRequest, params: Parameters, run: _Run, first: Pass,
                 encode: _TextStates) -> Pass:
    """The hires fix's pass at the larger size: the last `strength` of its own steps, its own prompt if any. Its
    prompt schedule is made for its own steps, numbers counting on from the first pass's (A1111's hires_steps)."""
    sd, hires = engine.sd, req.hires
    steps = hires.steps or params.steps
    sigmas = _last_part(_denoiser(sd).get_sigmas(steps, params.hires_schedule), steps, hires.strength)
    prompt = extract_loras(hires.prompt or req.prompt)[0]  # (the first prompt's LoRAs apply)
    negative = hires.negative_prompt or req.negative_prompt
    cond, uncond = _conditioning(prompt, negative, encode, params.steps, steps)
    factor = sd.config.vae.factor
    final_w, final_h = hires.final_size(params.width, params.height, factor)
    concat = _paint_everything(sd, final_w, final_h, _device(sd)) if sd.config.unet.in_channels == 9 else None
    merging = req.token_merging if hires.token_merging is None else hires.token_merging
    return Pass(run.hires_sampler, sigmas, cond, uncond, params.cfg_scale, params.guidance_until,
                _unet(engine, run, params, sigmas), merging, req.eta, concat,
                upscale=(hires.upscaler, *hires.target(params.width, params.height, factor)))


class _TextStates:
    """A run's text encoder: each distinct text encoded once (a schedule repeats texts, the hires pass reuses the
    first pass's), its states [1, tokens, width] shared by every image of the run."""

    def __init__(self, sd: StableDiffusion, clip_skip: int | None, embeddings):
        self.sd, self.clip_skip, self.embeddings = sd, clip_skip, embeddings
        self.done: dict[str, torch.Tensor] = {}

    def __call__(self, text: str) -> torch.Tensor:
        if text not in self.done:
            sd = self.sd
            states = encode_prompt(sd.tokenizer, sd.text_encoder, text, self.clip_skip, self.embeddings)
            self.done[text] = states.to(_device(sd))
        return self.done[text]


def _conditioning(prompt: str, negative: str, encode: _TextStates, steps: int, hires_steps: int | None = None):
    """The prompt's AND parts with their weights and the negative prompt (no AND, as in A1111), each a schedule of
    text states; all padded with empty-prompt chunks to one length, as the UNet takes them in one batch."""
    parts = [(weight, prompt_schedule(text, steps, hires_steps)) for text, weight in split_and(prompt)]
    negative_schedule = prompt_schedule(negative, steps, hires_steps)
    texts = {text for _, schedule in parts for _, text in schedule} | {text for _, text in negative_schedule}
    states = {text: encode(text) for text in texts}
    longest = max(s.shape[1] for s in states.values())
    for text, s in states.items():
        if s.shape[1] < longest:
            empty = encode("")
            states[text] = torch.cat([s] + [empty] * ((longest - s.shape[1]) // empty.shape[1]), dim=1)

    def scheduled(schedule):
        return ScheduledCond([(end, states[text]) for end, text in schedule])

    return Conditioning([(weight, scheduled(schedule)) for weight, schedule in parts]), scheduled(negative_schedule)


def _unet(engine: Engine, run: _Run, params: Parameters, sigmas: torch.Tensor) -> Callable:
    """What a pass calls as its UNet: fast mode's DeepCache around the eager UNet, else the engine's."""
    if params.deepcache is None:
        return engine.unet
    fast, steps_run, to_t = run.fast, len(sigmas) - 1, _denoiser(engine.sd).sigma_to_t
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


def _run_batch(engine: Engine, run: _Run, start: _Start, first: Pass, second: Pass | None, seeds: list[int],
               hooks: _Hooks):
    """4. One batch: its noise from its seeds, the first pass, and the hires fix's pass on the upscaled result."""
    device = _device(engine.sd)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    noise = torch.stack([torch.randn(run.latent_shape, generator=g) for g in generators]).to(device)
    if start.init_latent is not None:
        x0 = start.init_latent.repeat(len(seeds), 1, 1, 1)
        x = x0 + noise * first.sigmas[0]
    else:
        x = x0 = noise * first.sigmas[0]
    latents, finished = _sample(engine.sd, first, x, x0, generators, seeds, hooks)
    if second is None or not finished:
        return latents
    up = _upscale(engine.sd, latents, *second.upscale)
    generators = [torch.Generator().manual_seed(s) for s in seeds]  # the same seeds, the larger noise
    x = up + torch.stack([torch.randn(up.shape[1:], generator=g) for g in generators]).to(device) * second.sigmas[0]
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
    if isinstance(p.unet, DeepCacheUNet):
        p.unet.reset()  # each pass of each batch starts with a whole UNet pass
    denoiser = _denoiser(sd, _net(p.unet, p.concat))
    model = CFGDenoiser(denoiser, p.cfg_scale, p.sigmas, p.guidance_until)
    if p.keep is not None:
        model = _KeepUnmasked(model, *p.keep)
    hooks.denoised = start
    try:
        with _token_merging(sd, p.token_merging):
            if len(p.sigmas) > 1:
                return _run_sampler(p, model, x, hooks, generators, seeds), True
            return x, True
    except Interrupted:
        hooks.interrupted = True
    except _Skipped:
        pass
    return hooks.denoised, False


def _run_sampler(p: Pass, model, x, hooks: _Hooks, generators, seeds):
    """The sampler function with the arguments its kind takes: eta, a noise sampler that continues each image's
    own generator (or a Brownian tree from the seeds), DPM fast / adaptive's sigma range."""
    info, sigmas = p.sampler, p.sigmas
    opts, fn = dict(info.options), info.function
    extra = {"cond": p.cond, "uncond": p.uncond}
    if p.eta is not None and "eta" in fn.__code__.co_varnames:
        opts["eta"] = p.eta
    if info.stochastic:
        if fn in (S.sample_dpmpp_sde, S.sample_dpmpp_2m_sde, S.sample_dpmpp_3m_sde):
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


def _net(unet: Callable, concat: torch.Tensor | None):
    """The UNet as the denoiser's network: (x, t, cond) -> prediction; inpainting models get their extra channels."""

    def net(x, t, cond):
        if concat is not None:
            x = torch.cat([x, concat.repeat(x.shape[0] // concat.shape[0], 1, 1, 1).to(x.dtype)], dim=1)
        return unet(x, t, cond)

    return net


class _KeepUnmasked:
    """Inpainting with an ordinary model: outside the mask, the estimate is the original latent."""

    def __init__(self, inner, init_latent: torch.Tensor, keep: torch.Tensor):
        self.inner, self.init, self.keep = inner, init_latent, keep

    def __call__(self, x, sigma, **extra):
        denoised = self.inner(x, sigma, **extra)
        return self.init * self.keep + denoised * (1 - self.keep)


@contextlib.contextmanager
def _token_merging(sd: StableDiffusion, ratio: float):
    """The UNet merges `ratio` of its full-resolution tokens for this pass (0: none), as it did before afterwards."""
    before = {m: m.merge_ratio for m in sd.unet.modules() if hasattr(m, "merge_ratio")}
    sd.unet.set_token_merging(ratio)
    try:
        yield
    finally:
        for module, value in before.items():
            module.merge_ratio = value


def _paint_everything(sd: StableDiffusion, width: int, height: int, device) -> torch.Tensor:
    """An inpainting model's extra channels when there is no mask: all to be painted, over a grey image (as A1111)."""
    with torch.no_grad():
        grey = sd.vae.encode(torch.zeros(1, 3, height, width, device=device)).mode() * sd.config.scale_factor
    return torch.cat([torch.ones_like(grey[:, :1]), grey], dim=1)


def _upscale(sd: StableDiffusion, latents: torch.Tensor, upscaler: str, width: int, height: int, crop_x: int,
             crop_y: int) -> torch.Tensor:
    """Hires. fix's upscaling to width x height (rounded down to whole latents), then crop_x / crop_y latent
    columns / rows cut off, half on each side (the larger half at the end), as A1111 does."""
    f = sd.config.vae.factor
    rows, cols = height // f, width // f
    if upscaler in LATENT_UPSCALERS:
        mode, antialias = LATENT_UPSCALERS[upscaler]
        up = torch.nn.functional.interpolate(latents.float(), size=(rows, cols), mode=mode, antialias=antialias)
    else:
        with torch.no_grad():
            up = torch.cat([sd.vae.encode(imgs.to_tensor(p.resize((cols * f, rows * f), IMAGE_UPSCALERS[upscaler]))
                                          .to(latents.device)).mode().float() for p in decode(sd, latents)])
        up = up * sd.config.scale_factor
    return up[:, :, crop_y // 2:rows - (crop_y + 1) // 2, crop_x // 2:cols - (crop_x + 1) // 2]


DECODE_TILE = 64  # latents; larger latents (images over 512 px on a side) are decoded by overlapping tiles


def decode(sd: StableDiffusion, latents: torch.Tensor, tiny=None) -> list[Image.Image]:
    """5. Scaled latents -> PIL images, by the VAE (by tiles when large) or by a tiny (TAESD) decoder."""
    release_freed_memory()  # (the sampling's freed memory, before the decoder's large blocks)
    with torch.no_grad():
        if tiny is not None:
            return imgs.to_pil(tiny.decode(latents))
        return imgs.to_pil(sd.vae.decode_tiled(latents / sd.config.scale_factor, DECODE_TILE, DECODE_TILE // 4))


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


def _denoiser(sd: StableDiffusion, net: Callable | None = None) -> DiscreteDenoiser:
    return DiscreteDenoiser(net, sd.config.prediction)


def _device(sd: StableDiffusion) -> torch.device:
    return next(sd.unet.parameters()).device
