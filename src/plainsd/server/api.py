"""AUTOMATIC1111's API, as its clients speak it: request fields and defaults, their mapping onto plainsd's
GenerationRequest (generation_request), the server's own limits, and answers.

Every field A1111 accepts is accepted; the ones plainsd has no use for (restore_faces, alwayson_scripts,
subseeds ...) are echoed back and otherwise ignored. Checks raise BadRequest with one sentence
(GenerationRequest.check's, or a limit's), which the app answers with 422.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
from dataclasses import dataclass
from typing import Any, Optional

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from plainsd.diffusion.samplers import SAMPLERS
from plainsd.diffusion.schedules import SCHEDULE_LABELS, schedule_label
from plainsd.fast import choose as choose_fast
from plainsd.models.tome import check_ratio
from plainsd import scripts
from plainsd.request import MAX_SEED, GenerationRequest, HiresFix, check_clip_skip
from plainsd.pnginfo import parse_infotext, read_parameters


class BadRequest(ValueError):
    """A request that cannot be run as asked; the message says what is wrong and what is allowed."""


@dataclass
class Limits:
    max_size: int = 2048              # width and height, pixels
    max_steps: int = 150
    max_images: int = 16              # batch_size x n_iter per request
    max_image_pixels: int = 4096 * 4096   # decoded input images (init image, mask, png-info)
    max_image_bytes: int = 50 * 2**20


class Txt2ImgRequest(BaseModel):
    """A1111's StableDiffusionTxt2ImgProcessingAPI fields with its defaults (others are accepted as well)."""
    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    styles: Optional[list[str]] = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: Optional[str] = None
    sampler_index: str = "Euler"
    scheduler: Optional[str] = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: Optional[float] = None
    denoising_strength: Optional[float] = None
    s_min_uncond: Optional[float] = None
    s_churn: Optional[float] = None
    s_tmax: Optional[float] = None
    s_tmin: Optional[float] = None
    s_noise: Optional[float] = None
    override_settings: Optional[dict[str, Any]] = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None
    disable_extra_networks: bool = False
    comments: Optional[dict[str, Any]] = None
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: Optional[str] = None
    hr_sampler_name: Optional[str] = None
    hr_scheduler: Optional[str] = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    force_task_id: Optional[str] = None
    script_name: Optional[str] = None
    script_args: list = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict = Field(default_factory=dict)
    infotext: Optional[str] = None
    # plainsd's own: fast mode (DeepCache, guidance cut-off), the model's tiny decoder, and the fraction of the
    # steps with guidance (None: the model's recommendation); A1111 clients never send them
    fast: bool = False
    tiny_decoder: bool = False
    guidance_until: Optional[float] = None


class Img2ImgRequest(Txt2ImgRequest):
    """A1111's StableDiffusionImg2ImgProcessingAPI: txt2img's fields plus the init image and mask."""
    init_images: Optional[list] = None
    resize_mode: int = 0
    image_cfg_scale: Optional[float] = None
    mask: Optional[str] = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: Optional[int] = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: Optional[float] = None
    latent_mask: Optional[str] = None
    include_init_images: bool = False
    denoising_strength: Optional[float] = 0.75


class OptionsRequest(BaseModel):
    model_config = ConfigDict(extra="allow")


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    image: str = ""


# --- images in and out -------------------------------------------------------------------------------

def decode_image(data: Any, what: str, limits: Limits) -> Image.Image:
    """A base64 image (optionally a data: URL) -> a loaded PIL image, with size limits checked first."""
    if not isinstance(data, str) or not data:
        raise BadRequest(f"{what} must be a base64-encoded image")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    if len(data) > limits.max_image_bytes * 4 // 3 + 4:
        raise BadRequest(f"{what} is larger than the limit of {limits.max_image_bytes // 2**20} MB")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{what} is not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
    except (UnidentifiedImageError, OSError):
        raise BadRequest(f"{what} is not an image PIL can read (PNG, JPEG, WebP ...)") from None
    w, h = image.size
    if w * h > limits.max_image_pixels:
        raise BadRequest(f"{what} is {w}x{h}; images may have at most {limits.max_image_pixels} pixels")
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadRequest(f"{what} is a damaged image: {e}") from None
    return image


def encode_png(image: Image.Image, parameters: str | None = None) -> str:
    from PIL import PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    if parameters:
        meta.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --- requests -> GenerationRequest ----------------------------------------------------------------------

def sampler_and_schedule(req: Txt2ImgRequest) -> tuple[str, str]:
    """A1111's sampler fields: sampler_name, else the older sampler_index; the scheduler."""
    return req.sampler_name or req.sampler_index or "Euler", req.scheduler or "automatic"


# A1111's settings for token merging (override_settings of a request, or /sdapi/v1/options): the ratio, for
# img2img its own ratio where that is not 0, and for the hires fix's second pass its own where that is not 0
TOKEN_MERGING = ("token_merging_ratio", "token_merging_ratio_img2img", "token_merging_ratio_hr")


def token_merging_ratio(settings: dict, name: str) -> float | None:
    """settings[name] checked (a number from 0 to below 1), or None when it is not there."""
    value = settings.get(name)
    if value is not None:
        try:
            check_ratio(value, name)
        except ValueError as e:
            raise BadRequest(str(e)) from None
    return None if value is None else float(value)


def clip_skip_setting(settings: dict) -> int | None:
    """A1111's CLIP_stop_at_last_layers setting checked (A1111 offers 1 to 12), or None when it is not there."""
    value = settings.get("CLIP_stop_at_last_layers")
    if value is not None:
        try:
            check_clip_skip(value, "CLIP_stop_at_last_layers")
        except ValueError as e:
            raise BadRequest(str(e)) from None
        if value > 12:
            raise BadRequest(f"CLIP_stop_at_last_layers may be at most 12, got {value}")
    return value


def generation_request(req: Txt2ImgRequest, kind: str, limits: Limits, options: dict,
                       backend: str = "eager", styles_file: str | None = None) -> GenerationRequest:
    """An A1111 txt2img or img2img request as plainsd's GenerationRequest, checked: the server's own limits, then
    GenerationRequest.check's rules. options: the server's settings (/sdapi/v1/options), which a request's
    override_settings take precedence over, as A1111 applies them for the request; backend: what runs the
    server's UNet; styles_file: the server's styles, which the request's styles name."""
    overrides = req.override_settings or {}
    for name in TOKEN_MERGING:
        token_merging_ratio(overrides, name)
    settings = {**options, **overrides}
    clip_skip = clip_skip_setting(overrides)  # the request's, else the server's where it is not the last layer
    if clip_skip is None and (clip_skip_setting(options) or 1) > 1:
        clip_skip = options["CLIP_stop_at_last_layers"]
    sampler, schedule = sampler_and_schedule(req)
    request = GenerationRequest(
        prompt=req.prompt, negative_prompt=req.negative_prompt, steps=req.steps, sampler=sampler, schedule=schedule,
        cfg_scale=req.cfg_scale, guidance_until=req.guidance_until, seed=req.seed, width=req.width,
        height=req.height, batch_size=req.batch_size, batch_count=req.n_iter,
        clip_skip=clip_skip, eta=req.eta,
        fast=choose_fast(bool(req.fast), bool(req.tiny_decoder)), token_merging=_token_merging(settings, overrides, kind),
        styles=list(req.styles or []), styles_file=styles_file)
    if kind == "img2img":
        request = _img2img(request, req, limits)
    elif req.enable_hr:
        request = _hires(request, req, settings.get("token_merging_ratio_hr") or None)
    _check_limits(req, request, limits)
    try:
        request.check(backend=backend)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    _check_hires_size(request, limits)
    return request


def script_plan(req: Txt2ImgRequest, kind: str, request: GenerationRequest, limits: Limits,
                checkpoints=None) -> scripts.Prepared | None:
    """The script script_name names with its script_args checked (scripts.prepare), or None for none.
    Each request the script will run must keep the server's limits, and all of them together draw at most
    max_images pictures. checkpoints: the server's models, for an X/Y/Z plot's Checkpoint name axis."""
    if not req.script_name:
        if req.script_args:
            raise BadRequest("script_args were given without a script_name; name the script they are for "
                             "(/sdapi/v1/scripts lists them)")
        return None
    images = 0

    def check(cell: GenerationRequest) -> None:
        nonlocal images
        images += cell.batch_size * cell.batch_count
        if images > limits.max_images:
            raise BadRequest(f"the script would draw more than {limits.max_images} images (the most a request may "
                             f"draw); ask for fewer values")
        check_limits(cell, limits)

    try:
        return scripts.prepare(req.script_name, kind, request, req.script_args, scripts.Context(checkpoints, check))
    except ValueError as e:
        raise BadRequest(str(e)) from None


def check_limits(request: GenerationRequest, limits: Limits) -> None:
    """The server's limits on the size and steps of a request a script makes."""
    if max(request.width or 0, request.height or 0) > limits.max_size:
        raise BadRequest(f"width and height may be at most {limits.max_size}, got {request.width}x{request.height}")
    if (request.steps or 0) > limits.max_steps or (request.hires is not None and request.hires.steps > limits.max_steps):
        raise BadRequest(f"steps may be at most {limits.max_steps}")
    if request.width and request.height:
        _check_hires_size(request, limits)


def _token_merging(settings: dict, overrides: dict, kind: str) -> float:
    """The first pass's ratio as A1111 chooses it (its settings with the request's overrides applied): for img2img
    the request's own ratio where it sets one, else img2img's ratio where that is not 0, else the ratio."""
    if kind == "img2img" and overrides.get("token_merging_ratio"):
        return float(overrides["token_merging_ratio"])
    own = settings.get("token_merging_ratio_img2img") if kind == "img2img" else 0.0
    return float(own or settings.get("token_merging_ratio") or 0.0)


def _check_limits(req: Txt2ImgRequest, request: GenerationRequest, limits: Limits) -> None:
    """The server's own limits, on top of what any request must be (GenerationRequest.check)."""
    if not 8 <= min(request.width, request.height) or max(request.width, request.height) > limits.max_size:
        raise BadRequest(f"width and height must be between 8 and {limits.max_size}, got {request.width}x{request.height}")
    if request.steps > limits.max_steps:
        raise BadRequest(f"steps may be at most {limits.max_steps}, got {request.steps}")
    if request.batch_size * request.batch_count > limits.max_images:
        raise BadRequest(f"batch_size x n_iter may be at most {limits.max_images} images, "
                         f"got {request.batch_size} x {request.batch_count}")
    if req.seed < -1:
        raise BadRequest(f"seed must be -1 (random) or between 0 and {MAX_SEED}, got {req.seed}")
    if not 0.0 <= req.cfg_scale <= 100.0:
        raise BadRequest(f"cfg_scale must be between 0 and 100, got {req.cfg_scale}")
    if request.mask_blur > 64:
        raise BadRequest(f"mask_blur may be at most 64, got {request.mask_blur}")
    if request.hires is not None and request.hires.steps > limits.max_steps:
        raise BadRequest(f"hr_second_pass_steps may be at most {limits.max_steps}, got {request.hires.steps}")


def _check_hires_size(request: GenerationRequest, limits: Limits) -> None:
    if request.hires is not None:
        final_w, final_h = request.hires.final_size(request.width, request.height)
        if max(final_w, final_h) > limits.max_size:
            raise BadRequest(f"the hires fix would draw {final_w}x{final_h} from {request.width}x{request.height}; "
                             f"width and height may be at most {limits.max_size}")


HIRES_STRENGTH = 0.7  # A1111's Hires. fix denoising strength where a request gives none


def _hires(request: GenerationRequest, req: Txt2ImgRequest, token_merging: float | None) -> GenerationRequest:
    """enable_hr and its hr_* fields as the request's HiresFix (firstphase_*: A1111's older form, in which width
    and height are the final size)."""
    hr_x, hr_y = req.hr_resize_x, req.hr_resize_y
    if req.firstphase_width or req.firstphase_height:
        request = request.replace(width=req.firstphase_width or req.width, height=req.firstphase_height or req.height)
        hr_x, hr_y = req.width, req.height
    if req.hr_checkpoint_name not in (None, "", "Use same checkpoint"):
        raise BadRequest(f"hr_checkpoint_name: plainsd draws both passes with the same model; leave it out "
                         f"(got {req.hr_checkpoint_name!r})")
    hires = HiresFix(scale=req.hr_scale, width=hr_x, height=hr_y, upscaler=req.hr_upscaler or "Latent",
                     steps=req.hr_second_pass_steps,
                     strength=HIRES_STRENGTH if req.denoising_strength is None else req.denoising_strength,
                     sampler=None if req.hr_sampler_name in (None, "", "Use same sampler") else req.hr_sampler_name,
                     schedule=None if req.hr_scheduler in (None, "", "Use same scheduler") else req.hr_scheduler,
                     prompt=req.hr_prompt or None, negative_prompt=req.hr_negative_prompt or None,
                     token_merging=token_merging or None)
    return request.replace(hires=hires)


def _img2img(request: GenerationRequest, req: Img2ImgRequest, limits: Limits) -> GenerationRequest:
    """The init image, its denoising strength and resize mode, and the mask's fields."""
    if not req.init_images:
        raise BadRequest("init_images must hold one base64-encoded image")
    request = request.replace(init_image=decode_image(req.init_images[0], "init_images[0]", limits).convert("RGB"),
                              strength=0.75 if req.denoising_strength is None else req.denoising_strength,
                              resize_mode=req.resize_mode)
    if not req.mask:
        return request
    return request.replace(mask=decode_image(req.mask, "mask", limits),
                           mask_blur=req.mask_blur if req.mask_blur is not None else max(req.mask_blur_x, req.mask_blur_y),
                           inpainting_mask_invert=bool(req.inpainting_mask_invert))


def echo(req: BaseModel, drop_images: bool = False) -> dict:
    """The request as A1111 echoes it in `parameters` (init images and mask left out unless asked for)."""
    out = req.model_dump()
    if drop_images:
        out["init_images"] = None
        out["mask"] = None
    return out


def info_json(req: Txt2ImgRequest, result, request: GenerationRequest, sd) -> str:
    """The API's `info`: A1111's processing fields, from the parameters the run used."""
    p = result.parameters
    n = len(result.images)
    info = {
        "prompt": p.prompt, "all_prompts": [p.prompt] * n,  # (styled, as A1111's)
        "negative_prompt": p.negative_prompt, "all_negative_prompts": [p.negative_prompt] * n,
        "seed": p.seed, "all_seeds": result.seeds, "subseed": req.subseed, "all_subseeds": [req.subseed] * n,
        "subseed_strength": req.subseed_strength, "width": p.width, "height": p.height,
        "sampler_name": p.sampler, "scheduler": schedule_label(p.schedule), "cfg_scale": p.cfg_scale,
        "steps": p.steps, "batch_size": p.batch_size, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": p.model, "sd_model_hash": p.model_hash,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": p.denoising_strength, "extra_generation_params": {},
        "index_of_first_image": 0, "infotexts": result.infotexts, "styles": req.styles or [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": p.clip_skip,
        "is_using_inpainting_conditioning": sd.config.unet.in_channels == 9 and request.init_image is not None,
        "version": "plainsd", "interrupted": result.interrupted,
    }
    return json.dumps(info)


# --- lists -------------------------------------------------------------------------------------------

def samplers() -> list[dict]:
    return [{"name": s.name, "aliases": list(s.aliases), "options": {k: str(v) for k, v in s.options}}
            for s in SAMPLERS.values()]


def schedulers() -> list[dict]:
    return [{"name": key, "label": label, "aliases": None, "default_rho": 7.0 if key == "karras" else -1,
             "need_inner_model": False} for label, key in SCHEDULE_LABELS.items()]


def png_info(req: PngInfoRequest, limits: Limits) -> dict:
    if not req.image:
        raise BadRequest("image must be a base64-encoded image")
    image = decode_image(req.image, "image", limits)
    text = read_parameters(image)
    items = {k: v for k, v in image.info.items() if isinstance(v, str) and k != "parameters"}
    return {"info": text or "", "items": items, "parameters": parse_infotext(text) if text else {}}
