"""What a generation is asked to do, and what it did: GenerationRequest and Parameters.

The command line, the HTTP API and the web page all build a GenerationRequest and hand it to the pipeline;
its check() holds every rule about the values themselves, so each rule lives here once. The API adds only its
own limits (largest size, most steps, most images). What a run used, with the model's recommendations filled
in, comes back as Parameters: the PNG's A1111 "parameters" text and the API's info are written from it.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from . import detectors
from .diffusion.samplers import SAMPLERS, SamplerInfo, chosen_schedule, default_eta, resolve_sampler, takes
from .diffusion.noise import SOURCES
from .diffusion.schedules import schedule_key, schedule_label
from .fast import FastSettings
from .images import RESIZE_MODES, _named, inpainting_fill, resize_mode
from .models.tome import check_ratio
from .prompts import check_prompt, extract_loras
from .pnginfo import infotext
from .styles import apply_styles, read_styles

MAX_SEED = 2**32 - 1

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
    upscaler: a name in LATENT_UPSCALERS (the latents interpolated), IMAGE_UPSCALERS (decoded, resized, encoded)
    or an upscaler model's from the request's upscalers_dir (plainsd.upscale; decoded, upscaled by the model,
    resized to the target, encoded). steps: the second pass's steps before strength takes its share (0: as many as the first pass).
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

    def check(self, sampler: str, schedule: str | None, upscalers_dir: str | None = None) -> None:
        """The second pass's own settings; sampler and schedule: the first pass's; upscalers_dir: where the upscaler
        models are."""
        if self.upscaler not in LATENT_UPSCALERS and self.upscaler not in IMAGE_UPSCALERS:
            from .upscale import find_upscaler, upscaler_names
            try:
                find_upscaler(self.upscaler, upscalers_dir)
            except ValueError:
                raise ValueError(f"unknown hires upscaler {self.upscaler!r}; plainsd has "
                                 f"{', '.join([*LATENT_UPSCALERS, *upscaler_names(upscalers_dir)])}") from None
        if not 1.0 <= self.scale <= 8.0:
            raise ValueError(f"the hires scale must be between 1 and 8, got {self.scale}")
        if self.width < 0 or self.height < 0 or self.width % 8 or self.height % 8:
            raise ValueError(f"the hires width and height must be multiples of 8 (0: from the scale), "
                             f"got {self.width}x{self.height}")
        if not 0 <= self.steps <= 1000:
            raise ValueError(f"hires steps must be between 0 (as many as the first pass) and 1000, got {self.steps}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"the hires denoising strength must be between 0 and 1, got {self.strength}")
        if self.token_merging is not None:
            check_ratio(self.token_merging, "the hires token merging ratio", " (None: the first pass's)")
        for text, what in ((self.prompt, "the hires prompt"), (self.negative_prompt, "the hires negative prompt")):
            check_prompt(text or "", what)
        if self.sampler is not None or self.schedule is not None:
            try:
                self.resolve(sampler, schedule)
            except ValueError as e:
                raise ValueError(f"hires sampler: {e}") from None

    def resolve(self, sampler: str, schedule: str | None) -> tuple[SamplerInfo, str]:
        """The second pass's sampler and schedule: its own, else the first pass's; a schedule the user chose for
        the first pass (on its own or in the sampler's name) goes on to the second, as A1111's "Use same
        scheduler" does, while "automatic" means the second sampler's own."""
        first = chosen_schedule(sampler, schedule)
        return _sampler(self.sampler or sampler, self.schedule or first)


# Settings a request leaves as None come from the model's own recommendations (StableDiffusion.defaults), then these.
DEFAULTS = {"steps": 20, "sampler": "DPM++ 2M", "schedule": "automatic", "cfg_scale": 7.0, "guidance_until": 1.0}


# A1111's ControlNet extension's choices, in the order of its numbers (scripts/enums.py ControlMode, ResizeMode)
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
CONTROL_RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
PROCESSOR_RES = (64, 2048)   # the extension's preprocessor resolution slider


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet unit, as A1111's ControlNet extension names its settings."""
    model: str                               # a name from control.list_controlnets() (file stem, or "plainsd-base.controlnet-canny"), or a path
    image: Image.Image | None = None         # the control picture; None in img2img/inpaint = the init image (as the extension does)
    module: str = "none"                     # the preprocessor (detectors.MODULES names, the extension's spelling)
    weight: float = 1.0
    guidance_start: float = 0.0              # fraction of the steps before which the unit is off
    guidance_end: float = 1.0                # fraction of the steps after which it is off
    control_mode: str = "Balanced"           # "Balanced" | "My prompt is more important" | "ControlNet is more important"
    resize_mode: str = "Crop and Resize"     # "Just Resize" | "Crop and Resize" | "Resize and Fill"
    processor_res: int = 512                 # the preprocessor's resolution (pixel_perfect computes it instead)
    threshold_a: float | None = None         # the preprocessor's first / second threshold; None = its default
    threshold_b: float | None = None
    pixel_perfect: bool = False

    @property
    def mode(self) -> str:
        """The control mode's name (the extension's numbers 0-2 accepted)."""
        return _named(self.control_mode, CONTROL_MODES, "control mode")

    @property
    def resize(self) -> str:
        """The resize mode's name (the extension's numbers 0-2 accepted)."""
        return _named(self.resize_mode, CONTROL_RESIZE_MODES, "ControlNet resize mode")

    def check(self, has_init_image: bool = False) -> None:
        """One sentence for the first thing wrong with the unit's own values (its model: control.find_controlnet)."""
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"a ControlNet unit needs a model (a name from the ControlNet folder, or a path), "
                             f"got {self.model!r}")
        if self.image is not None and not isinstance(self.image, Image.Image):
            raise TypeError("a ControlNet unit's image must be a PIL image")
        if self.image is None and not has_init_image:
            raise ValueError(f"the ControlNet unit with {self.model!r} needs an image (only img2img and inpainting "
                             f"may leave it out, to use the init image)")
        detectors.check(self.module, self.threshold_a, self.threshold_b)
        _named(self.control_mode, CONTROL_MODES, "control mode")
        _named(self.resize_mode, CONTROL_RESIZE_MODES, "ControlNet resize mode")
        if not 0.0 <= self.weight <= 2.0:
            raise ValueError(f"a ControlNet unit's weight must be between 0 and 2, got {self.weight}")
        if not 0.0 <= self.guidance_start <= self.guidance_end <= 1.0:
            raise ValueError(f"a ControlNet unit's guidance start and end must satisfy 0 <= start <= end <= 1 "
                             f"(fractions of the steps), got {self.guidance_start} and {self.guidance_end}")
        low, high = PROCESSOR_RES
        if isinstance(self.processor_res, bool) or not isinstance(self.processor_res, int) \
                or not low <= self.processor_res <= high:
            raise ValueError(f"a ControlNet unit's processor_res (the preprocessor's resolution) must be a whole "
                             f"number from {low} to {high}, got {self.processor_res!r}")


@dataclass
class GenerationRequest:
    """Every parameter of one txt2img, img2img or inpainting run, the hires fix included.

    None means the model's recommendation (its checkpoint's metadata), else DEFAULTS; width and height left out
    are the init image's (rounded down to whole latents) or the model's resolution. guidance_until (0..1]:
    classifier-free guidance for that fraction of the steps only, the conditional prediction alone after it
    (guidance in a limited interval, Kynkäänniemi et al. 2024); 1 = every step. <lora:name:weight> tags in the
    prompt apply LoRA files from lora_dir; embedding names from embeddings_dir are replaced by their vectors.
    fast: DeepCache, a guidance cut-off and optionally the tiny decoder (plainsd.fast). token_merging [0, 1):
    A1111's "Token merging ratio" (models/tome.py); 0 = off. hires: a second, larger pass (txt2img only).
    """
    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = None
    sampler: str | None = None           # A1111 names: "DPM++ 2M", "Euler a", ... or "DPM++ 2M Karras"
    schedule: str | None = None          # "automatic", "karras", ... (SCHEDULE_LABELS)
    cfg_scale: float | None = None
    guidance_until: float | None = None
    seed: int | None = -1                # -1 (any negative, None): random; image i of the run gets seed + i
    width: int | None = None             # None or 0: the init image's or the model's
    height: int | None = None
    batch_size: int = 1
    batch_count: int = 1
    clip_skip: int | None = None         # 1 = the last CLIP layer, 2 = the penultimate; None or 0: the model's
    eta: float | None = None             # ancestral and DDIM samplers' noise
    init_image: Image.Image | None = None   # img2img and inpainting
    strength: float = 0.8                # img2img: A1111 runs int(steps * strength) + 1 steps; 1 replaces the image
    resize_mode: str = "just resize"     # images.RESIZE_MODES
    mask: Image.Image | None = None      # inpainting: white = repaint
    mask_blur: int = 4
    inpainting_mask_invert: bool = False
    # inpainting's options, as A1111's img2img has them (images.py does the image work)
    inpainting_fill: str = "original"    # masked content: fill, original, latent noise, latent nothing (or 0-3)
    inpaint_full_res: bool = False       # "only masked": the mask's box, padded, drawn at width x height
    inpaint_full_res_padding: int = 32   # pixels added around the mask's box on each side
    mask_round: bool = True              # the mask cut to 0 or 1 for the latents (False: its blurred edge kept)
    initial_noise_multiplier: float = 1.0   # img2img: the starting noise times this (A1111's 0 to 1.5)
    latent_mask: Image.Image | None = None  # a second mask, for the latents and the fill only (outpainting's)
    lora_dir: str | None = None
    embeddings_dir: str | None = None
    fast: FastSettings | None = None
    token_merging: float = 0.0
    hires: HiresFix | None = None
    # variation seeds, seed resize, tiling and the samplers' noise settings: A1111's fields of the same names
    subseed: int | None = -1             # the variation seed: -1 (any negative, None): random; image i gets subseed + i
    subseed_strength: float = 0.0        # 0: the seed's noise alone, 1: the variation seed's (slerp in between)
    seed_resize_from_w: int = 0          # both > 0: the noise drawn at this size and placed centred; 0 or -1: off
    seed_resize_from_h: int = 0
    tiling: bool = False                 # seamless pictures: every convolution pads circularly for the run
    s_churn: float | None = None         # Euler, Heun, DPM2: Karras et al.'s churn (None: 0, off) ...
    s_tmin: float | None = None          # ... at sigmas from s_tmin (None: 0) ...
    s_tmax: float | None = None          # ... to s_tmax (None or 0: no limit)
    s_noise: float | None = None         # the scale of the noise a sampler adds (None: 1)
    eta_noise_seed_delta: int = 0        # A1111's ENSD: a sampler's later noise comes from seed + this (0: off)
    randn_source: str = "GPU"            # A1111's random number source: GPU, CPU or NV (diffusion/noise.py)
    s_min_uncond: float = 0.0            # A1111's NGMS: below this sigma every second call skips the negative
                                         # prompt (diffusion/guidance.py; 0: off)
    eta_ancestral: float = 1.0           # A1111's settings: the eta of k-diffusion's samplers where eta is None ...
    eta_ddim: float = 0.0                # ... and DDIM's (each pass's sampler takes its own kind's)
    # A1111's styles: these names from styles_file (a csv, a folder of them or a wildcard) are applied in order to
    # the prompts (styled) before anything else, so the infotext holds the styled prompts, as in A1111
    styles: list[str] = field(default_factory=list)
    styles_file: str | None = None
    # A1111's ControlNet extension: its units, drawn together (plainsd.control); models by name from
    # controlnet_dir (the extension's models/ControlNet) or the shipped one, or by path
    controlnet: tuple[ControlUnit, ...] = ()
    controlnet_dir: str | None = None
    # upscaler models by name (plainsd.upscale: A1111's models/ESRGAN, models/RealESRGAN ... or one folder) for the
    # hires fix and SD upscale, run in tiles of upscaler_tile pixels overlapping by upscaler_tile_overlap (A1111's
    # ESRGAN_tile and ESRGAN_tile_overlap settings; tile 0: whole)
    upscalers_dir: str | None = None
    upscaler_tile: int = 192
    upscaler_tile_overlap: int = 8
    # A1111's refiner: this checkpoint (a file or a diffusers folder) takes the latents over once refiner_switch_at
    # of the denoising is done (by noise level, as A1111 counts it), with its own conditioning; with the hires fix,
    # in the second pass (A1111's default)
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None   # None with a refiner: 0.8 (A1111's); 0 = from the start, 1 = never

    def check(self, factor: int = 8, backend: str = "eager") -> None:
        """Raise ValueError (TypeError for a wrong kind of value) with one sentence for the first thing that is
        wrong. factor: the model's latent factor (pixels per latent); backend: what runs the UNet (runtime)."""
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise TypeError("prompt and negative_prompt must be strings")
        if self.styles:  # the prompts as they will be drawn are the styled ones
            self.styled().check(factor, backend)
            return
        for name, value in (("init_image", self.init_image), ("mask", self.mask), ("latent_mask", self.latent_mask)):
            if value is not None and not isinstance(value, Image.Image):
                raise TypeError(f"{name} must be a PIL image")
        self._check_numbers(factor)
        check_prompt(self.prompt)
        check_prompt(self.negative_prompt, "the negative prompt")
        _sampler(self.sampler or DEFAULTS["sampler"], self.schedule)
        if resize_mode(self.resize_mode) == RESIZE_MODES[3] and self.mask is not None:
            raise ValueError("the resize mode just resize (latent upscale) is for img2img without a mask; inpaint "
                             "with just resize, crop and resize or resize and fill")
        if self.mask is not None and self.init_image is None:
            raise ValueError("a mask needs an init image (inpainting)")
        self._check_inpainting()
        ratios = [self.token_merging] + ([self.hires.token_merging] if self.hires is not None else [])
        check_ratio(self.token_merging)
        if any(ratios) and backend != "eager":
            raise ValueError("token merging needs the eager UNet: the OpenVINO-compiled one cannot merge tokens "
                             "(leave out the openvino backend, or token merging)")
        if self.hires is not None:
            if self.init_image is not None:
                raise ValueError("hires fix is for txt2img; img2img draws at the width and height it is given")
            self.hires.check(self.sampler or DEFAULTS["sampler"], self.schedule, self.upscalers_dir)
            self._check_hires_loras()
            if self.width and self.height:
                _check_size(*self.hires.final_size(self.width, self.height, factor), factor)
        self._check_noise(factor, backend)
        self._check_controlnet(backend)
        from .upscale import check_tiling
        check_tiling(self.upscaler_tile, self.upscaler_tile_overlap)
        self._check_refiner(backend)

    def _check_hires_loras(self) -> None:
        """A1111 runs the hires pass with its own prompt's LoRAs; plainsd runs the prompt's in both passes, so a hires
        prompt with other LoRA tags (or none, which in A1111 leaves them out of that pass) is refused."""
        if not self.hires.prompt:
            return
        tags, hires_tags = (sorted(extract_loras(p)[1]) for p in (self.prompt, self.hires.prompt))
        if tags != hires_tags:
            show = lambda t: ", ".join(f"<lora:{n}:{w:g}>" for n, w in t) or "none"  # noqa: E731
            raise ValueError(f"the hires prompt's LoRA tags ({show(hires_tags)}) differ from the prompt's ({show(tags)}); "
                             "plainsd runs the same LoRAs in both passes: give the hires prompt the prompt's tags")

    def _check_refiner(self, backend: str) -> None:
        """The refiner's file and switch; what plainsd does not yet run beside a refiner is refused."""
        if not self.refiner_checkpoint:
            if self.refiner_switch_at is not None:
                raise ValueError("refiner_switch_at needs a refiner_checkpoint to switch to")
            return
        if not Path(self.refiner_checkpoint).exists():
            raise ValueError(f"no such refiner checkpoint file or folder: {self.refiner_checkpoint}")
        if self.refiner_switch_at is not None and not 0.0 <= self.refiner_switch_at <= 1.0:
            raise ValueError(f"refiner_switch_at (the fraction of the denoising done before the refiner takes over) "
                             f"must be between 0 and 1, got {self.refiner_switch_at}")
        if backend != "eager":
            raise ValueError(f"the {backend} backend and a refiner do not run together yet; leave out one of them")

    def _check_controlnet(self, backend: str) -> None:
        """Each unit's values and model; and what a ControlNet cannot be combined with (plainsd.control)."""
        if not self.controlnet:
            return
        from .control import check_combination, find_controlnet
        if isinstance(self.controlnet, ControlUnit) or not all(isinstance(u, ControlUnit) for u in self.controlnet):
            raise TypeError("controlnet must be a tuple of ControlUnit")
        for unit in self.controlnet:
            unit.check(self.init_image is not None)
            find_controlnet(unit.model, self.controlnet_dir)
        check_combination(self, backend)

    def _check_numbers(self, factor: int) -> None:
        _check_size(self.width, self.height, factor)
        if self.steps is not None and not 1 <= self.steps <= 1000:
            raise ValueError(f"steps must be between 1 and 1000, got {self.steps}")
        if self.batch_size < 1 or self.batch_count < 1:
            raise ValueError(f"batch size and batch count must be at least 1, got {self.batch_size} and "
                             f"{self.batch_count}")
        if self.guidance_until is not None and not 0.0 < self.guidance_until <= 1.0:
            raise ValueError(f"guidance_until (the fraction of the steps with guidance) must be in (0, 1], "
                             f"got {self.guidance_until}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength (denoising strength) must be between 0 and 1, got {self.strength}")
        if self.seed is not None and self.seed > MAX_SEED:
            raise ValueError(f"seed must be at most {MAX_SEED} (-1: random), got {self.seed}")
        if self.clip_skip:
            check_clip_skip(self.clip_skip)
        if self.mask_blur < 0:
            raise ValueError(f"mask blur must be at least 0, got {self.mask_blur}")

    def _check_inpainting(self) -> None:
        """The inpainting options: each has a use only with a mask (the noise multiplier with an init image)."""
        inpainting_fill(self.inpainting_fill)
        padding = self.inpaint_full_res_padding
        if isinstance(padding, bool) or not isinstance(padding, int) or not 0 <= self.inpaint_full_res_padding <= 256:
            raise ValueError(f"inpaint_full_res_padding (pixels around the masked area) must be a whole number from "
                             f"0 to 256, got {padding!r}")
        if not 0.0 <= self.initial_noise_multiplier <= 1.5:
            raise ValueError(f"initial_noise_multiplier must be between 0 and 1.5, got {self.initial_noise_multiplier}")
        if self.initial_noise_multiplier != 1.0 and self.init_image is None:
            raise ValueError("initial_noise_multiplier scales img2img's starting noise: it needs an init image "
                             "(leave it at 1 for txt2img)")
        if self.mask is None:
            used = [name for name, on in (("inpainting_fill", inpainting_fill(self.inpainting_fill) != "original"),
                                          ("inpaint_full_res", self.inpaint_full_res),
                                          ("latent_mask", self.latent_mask is not None)) if on]
            if used:
                raise ValueError(f"{', '.join(used)} need a mask (inpainting); give a mask or leave them out")
        elif self.latent_mask is not None and self.inpaint_full_res:
            raise ValueError("latent_mask cannot be used with inpaint_full_res (only masked): the second mask is "
                             "for the whole picture")

    def _check_noise(self, factor: int, backend: str) -> None:
        """Variation seed, seed resize, tiling, ENSD, and the sampler settings against the samplers that take them."""
        if self.subseed is not None and self.subseed > MAX_SEED:
            raise ValueError(f"subseed (the variation seed) must be at most {MAX_SEED} (-1: random), got {self.subseed}")
        if not 0.0 <= self.subseed_strength <= 1.0:
            raise ValueError(f"subseed_strength (the variation strength) must be between 0 and 1, "
                             f"got {self.subseed_strength}")
        w, h = self.seed_resize_from_w, self.seed_resize_from_h
        if (w > 0) != (h > 0) or (w > 0 and (w % factor or h % factor)):
            raise ValueError(f"seed_resize_from_w and seed_resize_from_h must both be multiples of {factor} (or both "
                             f"0 or -1: off), got {w}x{h}")
        if not 0 <= self.eta_noise_seed_delta <= MAX_SEED:
            raise ValueError(f"eta_noise_seed_delta (ENSD) must be between 0 and {MAX_SEED}, "
                             f"got {self.eta_noise_seed_delta}")
        if isinstance(self.s_min_uncond, bool) or not (isinstance(self.s_min_uncond, (int, float))
                                                        and self.s_min_uncond >= 0):
            raise ValueError(f"s_min_uncond (the negative guidance minimum sigma) must be a number of at least 0, "
                             f"got {self.s_min_uncond!r}")
        if self.randn_source not in SOURCES:
            raise ValueError(f"randn_source (the random number source) must be one of {', '.join(SOURCES)}, "
                             f"got {self.randn_source!r}")
        if self.tiling and backend != "eager":
            raise ValueError("tiling needs the eager UNet: the OpenVINO-compiled one cannot pad circularly "
                             "(leave out the openvino backend, or tiling)")
        for name in (*SAMPLER_SETTINGS, "eta_ancestral", "eta_ddim"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"{name} must be a number of at least 0, got {value!r}")
        if self.sampler is not None:  # (else checked once the model's recommended sampler is filled in)
            self._check_sampler_settings()

    def _check_sampler_settings(self) -> None:
        """eta and s_* are honoured by the samplers whose functions take them (k-diffusion's); a value that would
        change something, given for a run none of whose samplers takes it, is refused rather than dropped."""
        infos = [_sampler(self.sampler, self.schedule)[0]]
        if self.hires is not None and self.hires.sampler is not None:
            infos.append(self.hires.resolve(self.sampler, self.schedule)[0])
        if self.eta is not None and self.eta > 1 and any(info.name == "TCD" for info in infos):
            raise ValueError(f"TCD's eta (its gamma) must be between 0 and 1, got {self.eta}")
        for name, (_, no_effect) in SAMPLER_SETTINGS.items():
            value = getattr(self, name)
            if value is None or value in no_effect or any(takes(info, name) for info in infos):
                continue
            takers = ", ".join(s.name for s in SAMPLERS.values() if takes(s, name))
            raise ValueError(f"{name} is for the samplers {takers}; {' and '.join(i.name for i in infos)} "
                             f"{'does' if len(infos) == 1 else 'do'} not take it (leave it out, or choose one of those)")

    def first_seed(self) -> int:
        """The first image's seed: the request's, or a random one for -1; a run never goes past MAX_SEED."""
        return _fixed_seed(self.seed, self.batch_size * self.batch_count)

    def first_subseed(self) -> int:
        """The first image's variation seed, likewise (random for -1 even where the strength is 0, as A1111)."""
        return _fixed_seed(self.subseed, self.batch_size * self.batch_count)

    def sampler_options(self, info: SamplerInfo) -> dict:
        """The keyword arguments a sampler gets from the request: eta (A1111's default where none is given) and
        the s_* settings, where its function takes them; s_tmax 0 means no limit, as in A1111."""
        default = default_eta(info)  # DDIM's and k-diffusion's come from A1111's settings, TCD's is its own
        own = self.eta_ddim if default == 0.0 else self.eta_ancestral if default == 1.0 else default
        options = {"eta": own if self.eta is None else self.eta} if takes(info, "eta") else {}
        for name in ("s_churn", "s_tmin", "s_tmax", "s_noise"):
            value = getattr(self, name)
            if value is not None and takes(info, name):
                options[name] = math.inf if name == "s_tmax" and value == 0 else float(value)
        return options

    def replace(self, **changes) -> "GenerationRequest":
        return dataclasses.replace(self, **changes)

    def styled(self) -> "GenerationRequest":
        """The request with its styles applied to the prompt and negative prompt, and to the hires fix's own
        prompts where it has them (A1111 styles those too), and no styles left to apply."""
        if not self.styles:
            return self
        if isinstance(self.styles, str) or not all(isinstance(s, str) for s in self.styles):
            raise TypeError("styles must be a list of style names")
        if not self.styles_file:
            raise ValueError(f"styles {', '.join(map(repr, self.styles))} need a styles file (A1111's styles.csv), "
                             f"and none was given")
        table = read_styles(self.styles_file)
        prompt, negative = apply_styles(table, self.styles, self.prompt, self.negative_prompt)
        hires = self.hires
        if hires is not None and (hires.prompt or hires.negative_prompt):
            hr_prompt, hr_negative = apply_styles(table, self.styles, hires.prompt or self.prompt,
                                                  hires.negative_prompt or self.negative_prompt)
            hires = dataclasses.replace(hires, prompt=hr_prompt, negative_prompt=hr_negative)
        return self.replace(prompt=prompt, negative_prompt=negative, hires=hires, styles=[])


# The samplers' noise settings: name -> (A1111's infotext key, the values that change nothing where a sampler
# does not take it). eta has no such value: its default is the sampler's own (samplers.default_eta).
SAMPLER_SETTINGS = {"eta": ("Eta", ()), "s_churn": ("Sigma churn", (0,)), "s_tmin": ("Sigma tmin", (0,)),
                    "s_tmax": ("Sigma tmax", (0, math.inf)), "s_noise": ("Sigma noise", (1,))}


def sampler_fields(options: dict, info: SamplerInfo) -> dict:
    """The infotext fields of a sampler's options (sampler_options) that differ from its defaults, under A1111's
    keys: "Eta" ("Eta DDIM" for DDIM), "Sigma churn", "Sigma tmin", "Sigma tmax", "Sigma noise"."""
    fields = {}
    if "eta" in options and options["eta"] != default_eta(info):
        fields["Eta DDIM" if default_eta(info) == 0.0 else "Eta"] = options["eta"]
    for name, value in options.items():
        if name != "eta" and value not in SAMPLER_SETTINGS[name][1]:
            fields[SAMPLER_SETTINGS[name][0]] = value
    return fields


def _fixed_seed(seed: int | None, images: int) -> int:
    """A seed as a run uses it: the given one, or a random one for -1; seed + images - 1 stays within MAX_SEED."""
    seed = random.randint(0, MAX_SEED) if seed is None or seed < 0 else int(seed)
    return seed % (MAX_SEED - images) if seed + images - 1 > MAX_SEED else seed


def _check_size(width: int | None, height: int | None, factor: int) -> None:
    """Width and height (None or 0: chosen later) in whole latents."""
    for side in (width, height):
        if side and (side < 0 or side % factor):
            raise ValueError(f"width and height must be positive multiples of {factor}, got {width}x{height}")


def _sampler(name: str, schedule: str | None):
    info, chosen = resolve_sampler(name, schedule)
    schedule_key(chosen)  # an unknown schedule, also one that came with the sampler's name
    return info, chosen


def check_clip_skip(value, what: str = "clip skip") -> None:
    """1 = the text encoder's last layer, 2 = the penultimate, ... (how many there are: the model's check)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a whole number, 1 (the last CLIP layer) or more, got {value!r}")


@dataclass
class Parameters:
    """What a run used: the request with the model's recommendations filled in, as A1111 reports it."""
    prompt: str
    negative_prompt: str
    steps: int
    sampler: str                 # A1111's name of the sampler
    schedule: str                # its schedule (SCHEDULES key, or the label the user gave)
    cfg_scale: float
    guidance_until: float
    seed: int                    # the first image's
    width: int
    height: int
    batch_size: int
    batch_count: int
    clip_skip: int
    denoising_strength: float | None   # img2img's, or the hires fix's second pass's
    model: str
    model_hash: str | None
    vae_name: str | None = None        # a VAE file used instead of the model's own (A1111's "VAE"), and its short hash
    vae_hash: str | None = None
    deepcache: int | None = None       # fast mode's interval between whole UNet passes
    tiny_decoder: bool = False
    token_merging: float | None = None
    hires: HiresFix | None = None
    hires_sampler: str | None = None   # the second pass's sampler and schedule, as resolved
    hires_schedule: str | None = None
    inpainting: dict = field(default_factory=dict)  # A1111's infotext keys for inpainting (Mask blur ...)
    # variation seeds, seed resize, tiling and the samplers' noise settings, as the run used them
    subseed: int | None = None         # the first image's variation seed
    subseed_strength: float = 0.0
    seed_resize_from: tuple[int, int] | None = None   # (width, height)
    tiling: bool = False
    eta_noise_seed_delta: int | None = None   # where it changed the sampler's noise
    randn_source: str = "GPU"          # the random number source (written where not A1111's default)
    ngms: float | None = None          # NGMS, where a call skipped the negative prompt for it
    sampler_fields: dict = field(default_factory=dict)   # "Eta", "Sigma churn", ... (request.sampler_fields)
    controlnet: dict = field(default_factory=dict)   # "ControlNet 0": "Module: ..., Model: ...", ... (control.py)
    notes: list[str] = field(default_factory=list)   # for the user, not the infotext: model defaults used, ...
    lora_hashes: str | None = None     # "name: hash, ..." of the prompt's LoRAs (lora.infotext_hashes)
    refiner: str | None = None         # the refiner's name [short hash], once it has taken over (as A1111 writes it)
    refiner_switch_at: float | None = None

    def infotext(self, seed: int, subseed: int | None = None) -> str:
        """A1111's "parameters" text for the image with this seed (and variation seed)."""
        varied = bool(self.subseed_strength)
        return infotext(self.prompt, self.negative_prompt, **{
            "Steps": self.steps, "Sampler": self.sampler, "Schedule type": schedule_label(self.schedule),
            "CFG scale": float(self.cfg_scale), "Seed": seed, "Size": f"{self.width}x{self.height}",
            "Model hash": self.model_hash, "Model": self.model, "VAE hash": self.vae_hash, "VAE": self.vae_name,
            "Variation seed": (self.subseed if subseed is None else subseed) if varied else None,
            "Variation seed strength": self.subseed_strength if varied else None,
            "Seed resize from": "{}x{}".format(*self.seed_resize_from) if self.seed_resize_from else None,
            "Denoising strength": self.denoising_strength,
            "Clip skip": self.clip_skip if self.clip_skip > 1 else None, "ENSD": self.eta_noise_seed_delta,
            "Guidance until": self.guidance_until if self.guidance_until < 1.0 else None,
            "DeepCache interval": self.deepcache, "Decoder": "TAESD" if self.tiny_decoder else None,
            "Token merging ratio": self.token_merging, "RNG": self.randn_source if self.randn_source != "GPU" else None,
            "Tiling": "True" if self.tiling else None, "NGMS": self.ngms,
            **self.sampler_fields, **self._hires_fields(), **self.inpainting, **self.controlnet,
            "Lora hashes": self.lora_hashes, "Refiner": self.refiner,
            "Refiner switch at": self.refiner_switch_at if self.refiner else None})

    @staticmethod
    def inpainting_fields(req: GenerationRequest, painted: bool, only_masked: bool) -> dict:
        """The infotext keys A1111 writes for img2img's options. painted: the mask was used (not so for an
        all-black mask with "only masked", which A1111 draws as plain img2img); only_masked: the masked area was
        drawn on its own."""
        fill = inpainting_fill(req.inpainting_fill)
        masked = req.mask is not None
        fields = {"Mask mode": "Inpaint not masked" if masked and req.inpainting_mask_invert else None,
                  "Mask blur": req.mask_blur if masked and req.mask_blur > 0 else None,
                  "Inpaint area": "Only masked" if only_masked else None,
                  "Masked area padding": req.inpaint_full_res_padding if only_masked else None,
                  "Masked content": fill if painted and fill != "original" else None,
                  "Noise multiplier": req.initial_noise_multiplier if req.initial_noise_multiplier != 1.0 else None}
        return {key: value for key, value in fields.items() if value is not None}

    def _hires_fields(self) -> dict:
        hr = self.hires
        if hr is None:
            return {}
        resized = bool(hr.width or hr.height)
        return {
            "Hires upscale": None if resized else hr.scale,
            "Hires resize": f"{hr.width}x{hr.height}" if resized else None,
            "Hires steps": hr.steps or None, "Hires upscaler": hr.upscaler,
            "Hires sampler": self.hires_sampler if self.hires_sampler != self.sampler else None,
            "Hires schedule type": schedule_label(self.hires_schedule) if self.hires_schedule != self.schedule else None,
            "Hires prompt": hr.prompt if hr.prompt and hr.prompt != self.prompt else None,
            "Hires negative prompt": (hr.negative_prompt if hr.negative_prompt
                                      and hr.negative_prompt != self.negative_prompt else None),
            # A1111 writes the second pass's ratio in effect (its own, else the first pass's) where not 0
            "Token merging ratio hr": (self.token_merging if hr.token_merging is None else hr.token_merging) or None}
