"""txt2img, img2img and inpainting: the one place where the networks and the samplers meet.

    result = txt2img(sd, "a red circle", steps=20, sampler="DPM++ 2M", seed=1)
    result.images[0].save("out.png")

Seeds: image i of a run gets seed + i, and its noise (the initial latents and any noise a sampler adds
later) comes from its own generator, so an image is the same whether it was made alone or in a batch.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image

from . import images as imgs
from .diffusion import samplers as S
from .diffusion.denoisers import DiscreteDenoiser
from .diffusion.guidance import CFGDenoiser
from .diffusion.schedules import SCHEDULE_LABELS
from .models import StableDiffusion
from .pnginfo import infotext
from . import lora as lora_mod
from .embeddings import load_embeddings
from .fast import FAST, DeepCacheUNet, FastSettings
from .prompts import encode_pair, extract_loras
from .runtime import release_freed_memory

MAX_SEED = 2**32 - 1


class Interrupted(Exception):
    """Raised inside a run to stop it; the run returns what it has."""


class _Skipped(Exception):
    """Raised inside a run to end the current batch early and go on with the next (A1111's Skip)."""


@dataclass
class Result:
    images: list[Image.Image]
    seeds: list[int]
    infotexts: list[str]
    parameters: dict
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


# A1111's latent upscalers for Hires. fix: name -> (torch interpolation mode, antialias)
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True), "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True), "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# ... and its image upscalers that need no model (the decoded image resized, then encoded again)
IMAGE_UPSCALERS = {"None": Image.LANCZOS, "Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}


@dataclass
class HiresFix:
    """A1111's Hires. fix: txt2img at the given size, then the result upscaled and redrawn at the larger size
    as img2img (the first pass fixes the composition at the size the model knows; the second adds detail).

    scale multiplies width and height, unless width or height (A1111's hr_resize_x / hr_resize_y) name the
    final size: one of them keeps the aspect ratio, both crop the upscaled first pass to fill that size.
    upscaler: a name in LATENT_UPSCALERS (the latents interpolated) or IMAGE_UPSCALERS (decoded, resized,
    encoded). steps: the second pass's steps before strength takes its share (0: as many as the first pass).
    sampler, schedule, prompt, negative_prompt: the second pass's, if not the first pass's. token_merging: the
    second pass's token merging ratio (A1111's token_merging_ratio_hr; None: the first pass's)."""
    scale: float = 2.0
    width: int = 0
    height: int = 0
    upscaler: str = "Latent"
    steps: int = 0
    strength: float = 0.7
    sampler: str | None = None
    schedule: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    token_merging: float | None = None

    def target(self, width: int, height: int, factor: int = 8) -> tuple[int, int, int, int]:
        """(upscaled width, height, latent columns and rows to crop) for a first pass of width x height."""
        if not self.width and not self.height:
            return int(width * self.scale), int(height * self.scale), 0, 0
        if not self.height:
            return self.width, self.width * height // width, 0, 0
        if not self.width:
            return self.height * width // height, self.height, 0, 0
        if width / height < self.width / self.height:  # wider target: fit the width, crop rows
            up_w, up_h = self.width, self.width * height // width
        else:
            up_w, up_h = self.height * width // height, self.height
        return up_w, up_h, (up_w - self.width) // factor, (up_h - self.height) // factor

    def final_size(self, width: int, height: int, factor: int = 8) -> tuple[int, int]:
        """The size of the image the second pass draws from a first pass of width x height."""
        up_w, up_h, crop_x, crop_y = self.target(width, height, factor)
        return (up_w // factor - crop_x) * factor, (up_h // factor - crop_y) * factor

    def check(self):
        if self.upscaler not in LATENT_UPSCALERS and self.upscaler not in IMAGE_UPSCALERS:
            raise ValueError(f"unknown hires upscaler {self.upscaler!r}; plainsd has "
                             f"{', '.join([*LATENT_UPSCALERS, *IMAGE_UPSCALERS])}")
        if not 1.0 <= self.scale <= 8.0:
            raise ValueError(f"the hires scale must be between 1 and 8, got {self.scale}")
        if self.width < 0 or self.height < 0 or self.width % 8 or self.height % 8:
            raise ValueError(f"the hires width and height must be multiples of 8 (0: from the scale), "
                             f"got {self.width}x{self.height}")
        if not 0 <= self.steps <= 1000:
            raise ValueError(f"hires steps must be between 0 (as many as the first pass) and 1000, got {self.steps}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"the hires denoising strength must be between 0 and 1, got {self.strength}")
        if self.token_merging is not None and not 0.0 <= self.token_merging < 1.0:
            raise ValueError(f"the hires token merging ratio must be at least 0 and below 1 (None: the first "
                             f"pass's), got {self.token_merging}")


def _deepcache(sd: StableDiffusion, denoiser, fast: FastSettings, sigmas: torch.Tensor) -> DeepCacheUNet:
    """Fast mode's DeepCache for a run over these sigmas: its parts (start, end, early, late) are fractions of
    those steps, found at sampling time by their noise level (so any sampler's calls fall in the right part)."""
    steps_run = len(sigmas) - 1
    last = round(fast.deepcache_end * steps_run)
    whole_from_t = float(denoiser.sigma_to_t(sigmas[steps_run - last])) if last else None
    early = round(fast.deepcache_early * steps_run)
    early_until_t = float(denoiser.sigma_to_t(sigmas[early])) if early else None
    late = round(fast.deepcache_late * steps_run)
    late_from_t = float(denoiser.sigma_to_t(sigmas[steps_run - late])) if late else None
    return DeepCacheUNet(sd.unet, fast.deepcache_interval, fast.deepcache_depth,
                         warmup=round(fast.deepcache_start * steps_run), whole_from_t=whole_from_t,
                         early_depth=fast.deepcache_early_depth if early else None, early_until_t=early_until_t,
                         late_interval=fast.deepcache_late_interval if late else None, late_from_t=late_from_t)


def _check_size(sd: StableDiffusion, width: int, height: int):
    f = sd.config.vae.factor
    if width % f or height % f or width < f or height < f:
        raise ValueError(f"width and height must be positive multiples of {f}, got {width}x{height}")


def _seed(seed: int | None) -> int:
    if seed is None or seed < 0:
        return random.randint(0, MAX_SEED)
    if seed > MAX_SEED:
        raise ValueError(f"seed must be between -1 and {MAX_SEED}, got {seed}")
    return int(seed)


def _net(sd: StableDiffusion, concat: torch.Tensor | None, unet=None):
    """The UNet as the denoiser's network: (x, t, cond) -> prediction; inpainting models get their extra channels."""

    unet = unet or getattr(sd, "backend", None) or sd.unet  # fast mode's, a compiled UNet (runtime.prepare), the module

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


def _run_sampler(info: S.SamplerInfo, model, x, sigmas, extra_args, callback, progress, generators, seeds, eta):
    opts = dict(info.options)
    fn = info.function
    if eta is not None and "eta" in fn.__code__.co_varnames:
        opts["eta"] = eta
    if info.stochastic:
        if fn in (S.sample_dpmpp_sde, S.sample_dpmpp_2m_sde, S.sample_dpmpp_3m_sde):
            opts["noise_sampler"] = S.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seeds)
        else:
            ns = S.NoiseSampler(x)
            ns.generators = generators  # continue each image's own generator
            opts["noise_sampler"] = ns
    if fn is S.sample_dpm_fast:
        return fn(model, x, float(sigmas[-2]), float(sigmas[0]), len(sigmas) - 1, extra_args=extra_args,
                  callback=callback, disable=not progress, **opts)
    if fn is S.sample_dpm_adaptive:
        return fn(model, x, float(sigmas[-2]), float(sigmas[0]), extra_args=extra_args, callback=callback,
                  disable=not progress, **opts)
    return fn(model, x, sigmas, extra_args=extra_args, callback=callback, disable=not progress, **opts)


DEFAULTS = {"steps": 20, "sampler": "DPM++ 2M", "schedule": "automatic", "cfg_scale": 7.0, "guidance_until": 1.0}


def recommended(sd: StableDiffusion) -> dict:
    """The settings a call that leaves them out gets: the model's own recommendations (sd.defaults), then DEFAULTS."""
    return {**DEFAULTS, **getattr(sd, "defaults", {})}


def generate(sd: StableDiffusion, prompt: str, negative_prompt: str = "", *, steps: int | None = None,
             sampler: str | None = None, schedule: str | None = None, cfg_scale: float | None = None, seed: int = -1,
             width: int | None = None, height: int | None = None, batch_size: int = 1, batch_count: int = 1,
             clip_skip: int | None = None, eta: float | None = None, init_image: Image.Image | None = None,
             strength: float = 0.8, resize_mode: str = "just resize", mask: Image.Image | None = None,
             mask_blur: int = 4, inpainting_mask_invert: bool = False, guidance_until: float | None = None,
             callback: Callable[[StepInfo], None] | None = None, interrupt: Callable[[], bool] | None = None,
             skip: Callable[[], bool] | None = None, progress: bool = False, record_steps: bool = False,
             lora_dir: str | None = None, embeddings_dir: str | None = None,
             fast: bool | FastSettings = False, token_merging: float = 0.0,
             hires: HiresFix | None = None) -> Result:
    """The common path of txt2img, img2img and inpaint; see those for the parameters.

    Settings left as None come from the model's own recommended defaults (sd.defaults), then DEFAULTS.
    guidance_until (0..1]: classifier-free guidance for that fraction of the steps only, the conditional
    prediction alone after it (guidance in a limited interval, Kynkäänniemi et al. 2024; the late, low-noise
    steps draw the fine detail, which strong guidance there overshoots); 1 = every step.
    <lora:name:weight> tags in the prompt apply LoRA files from lora_dir for this run; the names of
    textual-inversion embeddings in embeddings_dir are replaced by their vectors.
    fast: True (or FastSettings) trades exactness for speed: DeepCache and a guidance cut-off;
    FastSettings(tiny_decoder=True) adds the model's tiny decoder (plainsd.fast.choose).
    token_merging [0, 1): A1111's "Token merging ratio": that fraction of the full-resolution level's tokens
    merged before self-attention (models/tome.py; faster, not exact); 0 = off.
    hires (txt2img only): a second, larger pass (A1111's Hires. fix; see HiresFix).
    """
    if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
        raise TypeError("prompt and negative_prompt must be strings")
    prompt_text, requested = extract_loras(prompt)
    loras = lora_mod.resolve(requested, lora_dir)
    embeddings = load_embeddings(embeddings_dir, sd) if embeddings_dir is not None else None
    with lora_mod.applied(sd, loras), _token_merging(sd, token_merging):
        return _generate(sd, prompt, prompt_text, negative_prompt, embeddings, steps=steps, sampler=sampler,
                         schedule=schedule, cfg_scale=cfg_scale, seed=seed, width=width, height=height,
                         batch_size=batch_size, batch_count=batch_count, clip_skip=clip_skip, eta=eta,
                         init_image=init_image, strength=strength, resize_mode=resize_mode, mask=mask,
                         mask_blur=mask_blur, inpainting_mask_invert=inpainting_mask_invert,
                         guidance_until=guidance_until, callback=callback, interrupt=interrupt, skip=skip,
                         progress=progress, record_steps=record_steps,
                         fast=FAST if fast is True else (fast or None), token_merging=token_merging,
                         hires=hires)


def _check_merging(sd: StableDiffusion, ratio: float | None):
    if ratio and getattr(sd, "backend", None) is not None:
        raise ValueError("token merging needs the eager UNet: the OpenVINO-compiled one cannot merge tokens "
                         "(leave out --backend openvino, or token merging)")


@contextlib.contextmanager
def _token_merging(sd: StableDiffusion, ratio: float):
    """The UNet merges `ratio` of its full-resolution tokens for this run (0: none), as it did before afterwards."""
    _check_merging(sd, ratio)
    before = {m: m.merge_ratio for m in sd.unet.modules() if hasattr(m, "merge_ratio")}
    sd.unet.set_token_merging(ratio)  # (checks the ratio)
    try:
        yield
    finally:
        for module, value in before.items():
            module.merge_ratio = value


def _generate(sd, prompt, prompt_text, negative_prompt, embeddings, *, steps, sampler, schedule, cfg_scale, seed,
              width, height, batch_size, batch_count, clip_skip, eta, init_image, strength, resize_mode, mask,
              mask_blur, inpainting_mask_invert, guidance_until, callback, interrupt, skip, progress,
              record_steps, fast, token_merging=0.0, hires=None) -> Result:
    chosen = recommended(sd)
    steps = chosen["steps"] if steps is None else steps
    sampler = chosen["sampler"] if sampler is None else sampler
    schedule = chosen["schedule"] if schedule is None else schedule
    cfg_scale = chosen["cfg_scale"] if cfg_scale is None else cfg_scale
    guidance_until = chosen["guidance_until"] if guidance_until is None else guidance_until
    if not 0.0 < guidance_until <= 1.0:
        raise ValueError(f"guidance_until (the fraction of the steps with guidance) must be in (0, 1], got {guidance_until}")
    width = width or (init_image.width // 8 * 8 if init_image is not None else chosen.get("width", sd.config.resolution))
    height = height or (init_image.height // 8 * 8 if init_image is not None else chosen.get("height", sd.config.resolution))
    _check_size(sd, width, height)
    if not 1 <= steps <= 1000:
        raise ValueError(f"steps must be between 1 and 1000, got {steps}")
    if batch_size < 1 or batch_count < 1:
        raise ValueError(f"batch size and batch count must be at least 1, got {batch_size} and {batch_count}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength (denoising strength) must be between 0 and 1, got {strength}")
    info, schedule_name = S.resolve_sampler(sampler, schedule)
    first_seed = _seed(seed)
    if first_seed + batch_size * batch_count - 1 > MAX_SEED:
        first_seed = first_seed % (MAX_SEED - batch_size * batch_count)

    device, factor = next(sd.unet.parameters()).device, sd.config.vae.factor
    latent_shape = (sd.config.vae.z_channels, height // factor, width // factor)
    denoiser = DiscreteDenoiser(_net(sd, None), sd.config.prediction)
    sigmas_full = denoiser.get_sigmas(steps, schedule_name)

    # img2img / inpaint: the starting latents, and for masks what to keep.
    init_latent = keep = concat = None
    paste = None
    sigmas = sigmas_full
    native_inpaint = sd.config.unet.in_channels == 9
    if init_image is not None:
        init = imgs.resize(init_image, width, height, resize_mode)
        with torch.no_grad():
            init_latent = sd.vae.encode(imgs.to_tensor(init).to(device)).mode() * sd.config.scale_factor
        run_steps = int(steps * strength)
        sigmas = sigmas_full[steps - run_steps:] if run_steps > 0 else sigmas_full[-1:]
        if mask is not None:
            m = imgs.prepare_mask(mask, width, height, mask_blur, inpainting_mask_invert)
            paste = (init, m)
            latent_mask = imgs.mask_tensor(m, latent_shape[2], latent_shape[1]).to(device).round()
            keep = 1 - latent_mask
            if native_inpaint:
                with torch.no_grad():
                    masked = imgs.to_tensor(init).to(device) * (imgs.mask_tensor(m, width, height).to(device) < 0.5)
                    masked_latent = sd.vae.encode(masked).mode() * sd.config.scale_factor
                concat = torch.cat([latent_mask, masked_latent], dim=1)
    elif mask is not None:
        raise ValueError("a mask needs an init image (inpainting)")
    if native_inpaint and concat is None:
        concat = _paint_everything(sd, width, height, device)
    hr = None
    if hires is not None:
        if init_image is not None:
            raise ValueError("hires fix is for txt2img; img2img draws at the width and height it is given")
        hires.check()
        _check_merging(sd, hires.token_merging)  # before the first pass, not after it
        up_w, up_h, crop_x, crop_y = hires.target(width, height, factor)
        final_w, final_h = hires.final_size(width, height, factor)
        _check_size(sd, final_w, final_h)
        hr_info, hr_schedule = S.resolve_sampler(hires.sampler or sampler, hires.schedule or schedule)
        hr_steps = hires.steps or steps
        hr_full = denoiser.get_sigmas(hr_steps, hr_schedule)
        hr_run = int(hr_steps * hires.strength)
        hr = dict(size=(up_w, up_h), crop=(crop_x, crop_y), info=hr_info,
                  sigmas=hr_full[hr_steps - hr_run:] if hr_run > 0 else hr_full[-1:],
                  concat=_paint_everything(sd, final_w, final_h, device) if native_inpaint else None)
    deepcache = hr_deepcache = None
    if fast is not None:
        guidance_until = min(guidance_until, fast.guidance_until)
        if fast.deepcache_interval > 1 and getattr(sd, "backend", None) is None:
            deepcache = _deepcache(sd, denoiser, fast, sigmas)
            if hr is not None:  # the second pass's parts by its own steps, as its guidance cut-off is
                hr_deepcache = _deepcache(sd, denoiser, fast, hr["sigmas"])
    denoiser.net = _net(sd, concat, deepcache)
    tiny = tiny_decoder(sd) if fast is not None and fast.tiny_decoder else None
    if fast is not None and fast.tiny_decoder and tiny is None:
        raise ValueError("this model has no tiny decoder: put a TAESD decoder file beside the checkpoint as "
                         "NAME.taesd.safetensors (taesd_decoder.safetensors in a diffusers folder), or on the command "
                         "line name the file with --tiny-decoder FILE")

    # One prompt for the whole batch: encode it once and repeat the states.
    cond, uncond = encode_pair(sd.tokenizer, sd.text_encoder, [prompt_text], [negative_prompt], clip_skip, embeddings)
    cond, uncond = cond.repeat(batch_size, 1, 1).to(device), uncond.repeat(batch_size, 1, 1).to(device)
    if hr is not None:
        hr_prompt = extract_loras(hires.prompt)[0] if hires.prompt else prompt_text  # (the prompt's LoRAs apply)
        hr_negative = hires.negative_prompt or negative_prompt
        hr["cond"], hr["uncond"] = cond, uncond
        if (hr_prompt, hr_negative) != (prompt_text, negative_prompt):
            c, u = encode_pair(sd.tokenizer, sd.text_encoder, [hr_prompt], [hr_negative], clip_skip, embeddings)
            hr["cond"], hr["uncond"] = c.repeat(batch_size, 1, 1).to(device), u.repeat(batch_size, 1, 1).to(device)
    guided = CFGDenoiser(denoiser, cfg_scale, sigmas, guidance_until)
    model = _KeepUnmasked(guided, init_latent, keep) if keep is not None and not native_inpaint else guided

    used_clip_skip = clip_skip or sd.config.text.clip_skip
    params = dict(prompt=prompt, negative_prompt=negative_prompt, steps=steps, sampler=info.name,
                  schedule=schedule_name, cfg_scale=cfg_scale, guidance_until=guidance_until, seed=first_seed,
                  width=width, height=height,
                  batch_size=batch_size, batch_count=batch_count, clip_skip=used_clip_skip,
                  denoising_strength=strength if init_image is not None else (hires.strength if hr else None),
                  model=sd.name,
                  model_hash=getattr(sd, "hash", None),
                  deepcache=deepcache.interval if deepcache is not None else None, tiny_decoder=tiny is not None,
                  token_merging=token_merging or None)
    if hr is not None:
        params["hires"] = {
            "Hires upscale": hires.scale if not (hires.width or hires.height) else None,
            "Hires resize": f"{hires.width}x{hires.height}" if hires.width or hires.height else None,
            "Hires steps": hires.steps or None, "Hires upscaler": hires.upscaler,
            "Hires sampler": hr["info"].name if hr["info"].name != info.name else None,
            "Hires schedule type": _schedule_label(hr_schedule) if hr_schedule != schedule_name else None,
            "Hires prompt": hires.prompt if hires.prompt and hires.prompt != prompt else None,
            "Hires negative prompt": (hires.negative_prompt if hires.negative_prompt
                                      and hires.negative_prompt != negative_prompt else None),
            # A1111 writes the second pass's ratio in effect (its own, else the first pass's) where not 0
            "Token merging ratio hr": (token_merging if hires.token_merging is None else hires.token_merging) or None}

    result = Result([], [], [], params)
    for batch in range(batch_count):
        seeds = [first_seed + batch * batch_size + i for i in range(batch_size)]
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        noise = torch.stack([torch.randn(latent_shape, generator=g) for g in generators]).to(device)
        if init_latent is not None:
            x = init_latent.repeat(batch_size, 1, 1, 1) + noise * sigmas[0]
        else:
            x = noise * sigmas[0]
        if deepcache is not None:
            deepcache.reset()  # each batch starts with a whole UNet pass
        frames: list[tuple[torch.Tensor, float]] = []
        total = len(sigmas) - 1 + (len(hr["sigmas"]) - 1 if hr is not None else 0)

        def sample(info, model, x, sigmas, cond, uncond, generators, start_denoised, offset=0, batch=batch):
            """The sampler's latents; where the run was interrupted or skipped, the estimate it had reached."""
            state = {"denoised": start_denoised}

            def on_step(d):
                state["denoised"] = d["denoised"]
                if record_steps:
                    frames.append((d["x"].detach().clone(), float(d["sigma"])))
                if callback is not None:
                    callback(StepInfo(offset + d["i"], total, batch, d["x"], d["denoised"], float(d["sigma"])))
                if interrupt is not None and interrupt():
                    raise Interrupted()
                if skip is not None and skip():
                    raise _Skipped()

            extra = {"cond": cond, "uncond": uncond if cfg_scale != 1.0 else None}
            try:
                if len(sigmas) > 1:
                    return _run_sampler(info, model, x, sigmas, extra, on_step, progress, generators, seeds, eta), True
                return x, True
            except Interrupted:
                result.interrupted = True
            except _Skipped:
                pass
            return state["denoised"], False

        start = x if init_latent is None else init_latent.repeat(batch_size, 1, 1, 1)
        latents, finished = sample(info, model, x, sigmas, cond, uncond, generators, start)
        if hr is not None and finished:
            # Hires. fix: the result upscaled, noised to the second pass's strength and denoised at the larger size.
            up = _upscale(sd, latents, hires.upscaler, *hr["size"], *hr["crop"])
            generators = [torch.Generator().manual_seed(s) for s in seeds]  # the same seeds, the larger noise
            x = up + torch.stack([torch.randn(up.shape[1:], generator=g) for g in generators]).to(device) * hr["sigmas"][0]
            if hr_deepcache is not None:
                hr_deepcache.reset()
            denoiser.net = _net(sd, hr["concat"], hr_deepcache)
            merging = contextlib.nullcontext() if hires.token_merging is None else _token_merging(sd, hires.token_merging)
            try:
                with merging:
                    latents, _ = sample(hr["info"], CFGDenoiser(denoiser, cfg_scale, hr["sigmas"], guidance_until), x,
                                        hr["sigmas"], hr["cond"], hr["uncond"], generators, up, offset=len(sigmas) - 1)
            finally:
                denoiser.net = _net(sd, concat, deepcache)
        pictures = decode(sd, latents, tiny)
        if paste is not None:
            original, m = paste
            pictures = [Image.composite(p, original, m) for p in pictures]
        if record_steps:
            decoded = [decode(sd, f / (1 + s**2) ** 0.5, tiny) for f, s in frames] + [pictures]
            result.frames.extend([[step[i] for step in decoded] for i in range(batch_size)])
        for s, p in zip(seeds, pictures):
            result.images.append(p)
            result.seeds.append(s)
            result.infotexts.append(_infotext(params, s))
        if result.interrupted:
            break
    return result


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
    """Scaled latents -> PIL images, by the VAE (by tiles when large) or by a tiny (TAESD) decoder."""
    release_freed_memory()  # (the sampling's freed memory, before the decoder's large blocks)
    with torch.no_grad():
        if tiny is not None:
            return imgs.to_pil(tiny.decode(latents))
        return imgs.to_pil(sd.vae.decode_tiled(latents / sd.config.scale_factor, DECODE_TILE, DECODE_TILE // 4))


def tiny_decoder(sd: StableDiffusion):
    """The model's TAESD decoder (loaded once from sd.tiny_decoder_path), or None if it has none."""
    if getattr(sd, "tiny_decoder", None) is None and getattr(sd, "tiny_decoder_path", None):
        from .fast import load_tiny_decoder
        # kept outside the module tree, so that saving the model does not write it into the checkpoint
        object.__setattr__(sd, "tiny_decoder", load_tiny_decoder(sd.tiny_decoder_path, sd.vae.dtype))
    return getattr(sd, "tiny_decoder", None)


def _schedule_label(name: str) -> str:
    return {v: k for k, v in SCHEDULE_LABELS.items()}.get(name, name)


def _infotext(p: dict, seed: int) -> str:
    schedule_label = _schedule_label(p["schedule"])
    return infotext(
        p["prompt"], p["negative_prompt"], **{
            "Steps": p["steps"], "Sampler": p["sampler"], "Schedule type": schedule_label,
            "CFG scale": float(p["cfg_scale"]), "Seed": seed, "Size": f"{p['width']}x{p['height']}",
            "Model hash": p["model_hash"], "Model": p["model"], "Denoising strength": p["denoising_strength"],
            "Clip skip": p["clip_skip"] if p["clip_skip"] and p["clip_skip"] > 1 else None,
            "Guidance until": p["guidance_until"] if p["guidance_until"] < 1.0 else None,
            "DeepCache interval": p.get("deepcache"), "Decoder": "TAESD" if p.get("tiny_decoder") else None,
            "Token merging ratio": p.get("token_merging"), **p.get("hires", {})})


def txt2img(sd: StableDiffusion, prompt: str, negative_prompt: str = "", **kwargs) -> Result:
    """Text to image.

    steps, sampler (A1111 names: "DPM++ 2M", "Euler a", ... or "DPM++ 2M Karras"), schedule ("automatic",
    "karras", ...), cfg_scale, seed (-1: random), width/height (multiples of 8; default the model's
    resolution), batch_size, batch_count, clip_skip, eta, callback(StepInfo), interrupt() -> bool (stop
    and return what there is), skip() -> bool (end this batch early, go on with the next), progress (a bar
    per step), record_steps (one decoded frame per step, for the emerging-image view).
    """
    for key in ("init_image", "mask"):
        if kwargs.get(key) is not None:
            raise TypeError(f"txt2img takes no {key}; use img2img or inpaint")
    return generate(sd, prompt, negative_prompt, **kwargs)


def img2img(sd: StableDiffusion, init_image: Image.Image, prompt: str, negative_prompt: str = "", *,
            strength: float = 0.8, resize_mode: str = "just resize", **kwargs) -> Result:
    """Image to image: the init image is noised to `strength` (0 keeps it, 1 replaces it) and denoised."""
    if not isinstance(init_image, Image.Image):
        raise TypeError("init_image must be a PIL image")
    return generate(sd, prompt, negative_prompt, init_image=init_image, strength=strength, resize_mode=resize_mode, **kwargs)


def inpaint(sd: StableDiffusion, init_image: Image.Image, mask: Image.Image, prompt: str, negative_prompt: str = "", *,
            strength: float = 0.75, mask_blur: int = 4, inpainting_mask_invert: bool = False, **kwargs) -> Result:
    """Repaint the white part of the mask. 9-channel inpainting models do it natively; other models by
    keeping the original latents outside the mask at every step. The result is pasted over the original
    through the blurred mask, so the unmasked part stays exactly as it was."""
    if not isinstance(init_image, Image.Image) or not isinstance(mask, Image.Image):
        raise TypeError("init_image and mask must be PIL images")
    return generate(sd, prompt, negative_prompt, init_image=init_image, mask=mask, strength=strength,
                    mask_blur=mask_blur, inpainting_mask_invert=inpainting_mask_invert, **kwargs)
