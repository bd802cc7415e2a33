"""AUTOMATIC1111's API, as its clients speak it: request fields and defaults, their mapping onto plainsd's
GenerationRequest (generation_request), the server's own limits, and answers.

Every field of A1111's txt2img and img2img requests is honoured, or accepted only at the value that asks for
nothing (NOT_SUPPORTED: restore_faces, firstpass_image, ...) and refused otherwise; a field A1111 does not have
is refused, and so is an override_settings key plainsd does not act on (check_fields). alwayson_scripts takes the
ControlNet extension's units (controlnet.py) and refuses other scripts. The models state the fixed
rules in the OpenAPI schema (pydantic enforces them) and state_limits adds the server's own. Checks raise
BadRequest with one sentence (GenerationRequest.check's, or a limit's), which the app answers with 422.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema

from plainsd.diffusion.samplers import SAMPLERS, SCHEDULE_SUFFIXES, resolve_sampler, takes
from plainsd.diffusion.schedules import SCHEDULE_LABELS, SCHEDULES, schedule_label
from plainsd.fast import choose as choose_fast
from plainsd.images import INPAINTING_FILLS
from plainsd.models.tome import check_ratio
from plainsd import scripts
from plainsd.prompts import extract_loras
from plainsd.request import MAX_SEED, GenerationRequest, HiresFix, check_clip_skip
from plainsd.pnginfo import parse_infotext, read_parameters

from . import controlnet


class BadRequest(ValueError):
    """A request that cannot be run as asked; the message says what is wrong and what is allowed."""


@dataclass
class Limits:
    max_size: int = 2048              # width and height, pixels
    max_steps: int = 150
    max_images: int = 16              # batch_size x n_iter per request
    max_image_pixels: int = 4096 * 4096   # decoded input images (init image, mask, png-info)
    max_image_bytes: int = 50 * 2**20


# --- what the schema says a name may be -------------------------------------------------------------------

def _any_of(words) -> str:
    """Alternatives for a regular expression that JSON Schema (ECMA 262), Rust's and Python's engines read alike."""
    escaped = (re.sub(r"([\\.^$|?*+()\[\]{}])", r"\\\1", w) for w in sorted(words, key=len, reverse=True))
    return "|".join(escaped)


def sampler_pattern(*others: str) -> str:
    """The sampler names the API takes, as a regular expression: A1111's names and aliases as /sdapi/v1/samplers
    lists them, optionally followed by a schedule as A1111's older names carry it ("DPM++ 2M Karras"), or one of
    `others`. (The command line also takes other capitalisations; A1111's API does not, nor does this.)"""
    names = [name for s in SAMPLERS.values() for name in (s.name, *s.aliases)]
    suffixes = [suffix for suffix, key in SCHEDULE_SUFFIXES.items() if key in SCHEDULES]
    return f"^(?:(?:{_any_of(names)})(?:{_any_of(suffixes)})?|{_any_of(others)})$"


# A1111's schedule labels ("Karras") and names ("karras"); "" is automatic, as in A1111
Schedule = Literal[tuple(dict.fromkeys(["", *SCHEDULE_LABELS, *SCHEDULE_LABELS.values(), *SCHEDULES]))]
HiresSchedule = Literal[tuple(dict.fromkeys(["Use same scheduler", *Schedule.__args__]))]
SAMPLER = sampler_pattern("")
HIRES_SAMPLER = sampler_pattern("", "Use same sampler")


class ProcessingRequest(BaseModel):
    """The fields A1111's txt2img and img2img requests share (its StableDiffusionProcessing), with its defaults.
    Sizes and step counts also have the server's own maxima (Limits), which the OpenAPI schema states."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = ""
    negative_prompt: str = ""
    styles: Optional[list[str]] = None
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1: random")
    subseed: int = Field(-1, ge=-1, le=MAX_SEED, description="the variation seed; -1: random")
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0, description="0: the seed's noise, 1: the subseed's")
    seed_resize_from_h: int = Field(-1, ge=-1, description="with seed_resize_from_w: the noise drawn at that size")
    seed_resize_from_w: int = Field(-1, ge=-1)
    sampler_name: Optional[str] = Field(None, pattern=SAMPLER, description="a name from /sdapi/v1/samplers")
    sampler_index: str = Field("Euler", pattern=SAMPLER, description="A1111's older sampler_name")
    scheduler: Optional[Schedule] = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = Field(50, ge=1)
    cfg_scale: float = Field(7.0, ge=0.0, le=100.0)
    width: int = Field(512, ge=8, multiple_of=8)
    height: int = Field(512, ge=8, multiple_of=8)
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: Optional[float] = Field(None, ge=0.0)
    denoising_strength: Optional[float] = Field(None, ge=0.0, le=1.0)
    s_min_uncond: Optional[float] = Field(None, ge=0.0)
    s_churn: Optional[float] = Field(None, ge=0.0)
    s_tmax: Optional[float] = Field(None, ge=0.0, description="0: no limit")
    s_tmin: Optional[float] = Field(None, ge=0.0)
    s_noise: Optional[float] = Field(None, ge=0.0)
    override_settings: Optional[dict[str, Any]] = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None
    disable_extra_networks: bool = False
    firstpass_image: Optional[str] = None
    comments: Optional[dict[str, Any]] = None
    force_task_id: Optional[str] = None
    script_name: Optional[str] = None
    script_args: list = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: Annotated[dict, WithJsonSchema(controlnet.alwayson_schema())] = Field(
        default_factory=dict, description="the ControlNet extension's units: {\"controlnet\": {\"args\": [unit, ...]}}")
    infotext: Optional[str] = None
    # plainsd's own: fast mode (DeepCache, guidance cut-off), the model's tiny decoder, and the fraction of the
    # steps with guidance (None: the model's recommendation); A1111 clients never send them
    fast: bool = False
    tiny_decoder: bool = False
    guidance_until: Optional[float] = Field(None, gt=0.0, le=1.0)


class Txt2ImgRequest(ProcessingRequest):
    """A1111's StableDiffusionTxt2ImgProcessingAPI: the shared fields plus the hires fix."""
    enable_hr: bool = False
    firstphase_width: int = Field(0, ge=0, multiple_of=8)
    firstphase_height: int = Field(0, ge=0, multiple_of=8)
    hr_scale: float = Field(2.0, ge=1.0, le=8.0)
    hr_upscaler: Optional[str] = Field(None, description="a name from /sdapi/v1/latent-upscale-modes or /sdapi/v1/upscalers")
    hr_second_pass_steps: int = Field(0, ge=0)
    hr_resize_x: int = Field(0, ge=0, multiple_of=8)
    hr_resize_y: int = Field(0, ge=0, multiple_of=8)
    hr_checkpoint_name: Optional[str] = None
    hr_sampler_name: Optional[str] = Field(None, pattern=HIRES_SAMPLER)
    hr_scheduler: Optional[HiresSchedule] = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(ProcessingRequest):
    """A1111's StableDiffusionImg2ImgProcessingAPI: the shared fields plus the init image and mask."""
    init_images: Optional[list[str]] = None
    resize_mode: int = Field(0, ge=0, le=3)
    image_cfg_scale: Optional[float] = None
    mask: Optional[str] = None
    mask_blur_x: int = Field(4, ge=0, le=64)
    mask_blur_y: int = Field(4, ge=0, le=64)
    mask_blur: Optional[int] = Field(None, ge=0, le=64)
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    initial_noise_multiplier: Optional[float] = None
    latent_mask: Optional[str] = None
    include_init_images: bool = False
    denoising_strength: Optional[float] = Field(0.75, ge=0.0, le=1.0)


def state_limits(schema: dict, limits: Limits) -> dict:
    """The app's OpenAPI schema with the server's own limits stated as maxima (the models know only the fixed
    rules; _check_limits enforces these). batch_size x n_iter has its own limit, which a schema cannot state."""
    most = {"width": limits.max_size, "height": limits.max_size, "firstphase_width": limits.max_size,
            "firstphase_height": limits.max_size, "hr_resize_x": limits.max_size, "hr_resize_y": limits.max_size,
            "steps": limits.max_steps, "hr_second_pass_steps": limits.max_steps,
            "seed_resize_from_w": limits.max_size, "seed_resize_from_h": limits.max_size,
            "batch_size": limits.max_images, "n_iter": limits.max_images}
    for model in (Txt2ImgRequest, Img2ImgRequest):
        fields = schema.get("components", {}).get("schemas", {}).get(model.__name__, {}).get("properties", {})
        for name in most.keys() & fields.keys():
            fields[name]["maximum"] = most[name]
    return schema


class OptionsRequest(BaseModel):
    model_config = ConfigDict(extra="allow")


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = ""


class ImagesResponse(BaseModel):
    """The answer of txt2img and img2img, as A1111's."""
    images: list[str]
    parameters: dict
    info: str


class PngInfoResponse(BaseModel):
    info: str
    items: dict
    parameters: dict


class ErrorResponse(BaseModel):
    """What a refused request gets (422 for a bad request, 503 when the queue is full)."""
    detail: str
    error: Optional[str] = None
    errors: Optional[list] = None


def validation_sentence(errors: list[dict]) -> str:
    """pydantic's complaint about a request as one sentence naming the field (every unknown field at once)."""
    unknown = [".".join(map(str, e["loc"][1:])) or str(e["loc"][-1]) for e in errors if e.get("type") == "extra_forbidden"]
    if unknown:
        return (f"unknown field{'s' * (len(unknown) > 1)} {', '.join(unknown)}: A1111's request has no such field, and "
                f"plainsd refuses what it would not use (/docs lists the fields)")
    first = errors[0] if errors else {}
    where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "the request body"
    kind, msg = first.get("type"), first.get("msg", "Input is not valid")
    if kind == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'malformed')})"
    if kind == "value_error":  # a field's own check (e.g. a ControlNet unit's resize_mode): its sentence
        return f"{where}: {msg.removeprefix('Value error, ')}"
    if kind == "string_pattern_mismatch":
        return f"{where}: unknown sampler {_json(first.get('input'))}; /sdapi/v1/samplers lists the names"
    sentence = f"{where} {msg[6:]}" if msg.startswith("Input ") else f"{where}: {msg[:1].lower()}{msg[1:]}"
    return sentence if kind == "missing" or "input" not in first else f"{sentence}, got {_json(first['input'])}"


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


def encode_png(image: Image.Image, parameters: str | None = None, texts: dict[str, str] | None = None) -> str:
    """A base64 PNG with A1111's "parameters" text (and further text chunks, e.g. Extras' "postprocessing")."""
    from PIL import PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    for key, text in {"parameters": parameters, **(texts or {})}.items():
        if text:
            meta.add_text(key, text)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --- requests -> GenerationRequest ----------------------------------------------------------------------

def sampler_and_schedule(req: ProcessingRequest) -> tuple[str, str]:
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


def checkpoints_limit_setting(settings: dict) -> int:
    """A1111's sd_checkpoints_limit checked (A1111 offers 1 to 10): 1 keeps one UNet in memory at a time in a refiner
    run (runtime.Engine.checkpoints_limit), more keeps the base's and the refiner's both."""
    value = settings.get("sd_checkpoints_limit", 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10:
        raise BadRequest(f"sd_checkpoints_limit must be a whole number from 1 to 10, got {value!r}")
    return value


# --- what plainsd refuses ----------------------------------------------------------------------------------

# A1111 fields that ask for something plainsd does not do: accepted only at the values that ask for nothing
# (A1111's default and its spellings of "none"), refused with the reason otherwise
NOT_SUPPORTED = {
    "restore_faces": ((None, False), "plainsd has no face restoration"),
    "firstpass_image": ((None, ""), "plainsd draws the hires fix's first pass itself"),
    "hr_checkpoint_name": ((None, "", "Use same checkpoint"), "plainsd draws both passes with the same model"),
    "force_task_id": ((None, ""), "plainsd has no task ids (/sdapi/v1/progress reports the job that runs)"),
    "comments": ((None, {}), "A1111 discards a request's comments and plainsd takes none"),
    "image_cfg_scale": ((None,), "it is for instruct-pix2pix models, which plainsd does not load"),
}

# A1111's settings of the same purpose as the noise fields of a request (override_settings, /sdapi/v1/options):
# used where the request leaves the field out, and for the samplers that take them; eta_ancestral is the eta of
# k-diffusion's samplers, eta_ddim DDIM's
NOISE_SETTINGS = ("eta_ancestral", "eta_ddim", "s_churn", "s_tmin", "s_tmax", "s_noise", "eta_noise_seed_delta",
                  "randn_source", "s_min_uncond", "tiling")
# the settings a request's fields take their defaults from (A1111 keeps them for later requests where a request
# asks not to restore its override_settings) ...
REQUEST_SETTINGS = ("CLIP_stop_at_last_layers", *TOKEN_MERGING, *NOISE_SETTINGS, "initial_noise_multiplier",
                    *controlnet.SETTINGS, "ESRGAN_tile", "ESRGAN_tile_overlap")
# ... and with the model (app.py), every setting plainsd acts on
HONOURED_SETTINGS = ("sd_model_checkpoint", "sd_vae", "sd_checkpoints_limit", *REQUEST_SETTINGS)


def default_options() -> dict:
    """A1111's (and its ControlNet extension's) defaults of the settings plainsd knows: what a server starts with
    (/sdapi/v1/options) and what `plainsd batch` maps its requests under."""
    return {"samples_format": "png", "CLIP_stop_at_last_layers": 1, "sd_vae": "Automatic", "sd_checkpoints_limit": 1,
            "token_merging_ratio": 0.0, "token_merging_ratio_img2img": 0.0,
            "token_merging_ratio_hr": 0.0, "eta_noise_seed_delta": 0, "eta_ancestral": 1.0, "eta_ddim": 0.0,
            "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0, "randn_source": "GPU", "s_min_uncond": 0.0,
            "tiling": False,
            "initial_noise_multiplier": 1.0, "ESRGAN_tile": 192, "ESRGAN_tile_overlap": 8, **controlnet.SETTINGS}


def _json(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def check_fields(req: ProcessingRequest, options: dict) -> None:
    """Refuse what a request asks for that plainsd would otherwise not do (one sentence naming the field)."""
    for name, (nothing, reason) in NOT_SUPPORTED.items():
        value = getattr(req, name, None)
        if value is not None and value not in nothing:
            allowed = " or ".join(_json(v) for v in nothing)
            raise BadRequest(f"{name}: {reason}, so only {allowed} is accepted here, got {_json(value)}")
    if req.do_not_save_samples and req.save_images:
        raise BadRequest("do_not_save_samples and save_images contradict each other; send one of them")
    check_settings(req.override_settings or {}, options, "override_settings")
    _check_sampler_fields(req)
    if isinstance(req, Img2ImgRequest):
        if req.init_images and len(req.init_images) > 1:
            raise BadRequest(f"init_images holds {len(req.init_images)} images; plainsd draws from one init image "
                             f"(a batch of one image's variations: batch_size)")
        if req.mask_blur is None and req.mask_blur_x != req.mask_blur_y:
            raise BadRequest(f"mask_blur_x and mask_blur_y differ ({req.mask_blur_x}, {req.mask_blur_y}); plainsd "
                             f"blurs a mask alike in both directions (send mask_blur)")


def check_settings(values: dict, current: dict, what: str, also: tuple[str, ...] = ()) -> None:
    """A1111 settings (override_settings, or /sdapi/v1/options) plainsd acts on, or left at the value the server
    has (a client that sends back the options it read); `also`: further names acted on."""
    acted_on = {*HONOURED_SETTINGS, *also}
    ignored = sorted(k for k, v in values.items() if k not in acted_on and (k not in current or current[k] != v))
    if ignored:
        raise BadRequest(f"{what}: plainsd does not act on {', '.join(ignored)}; it takes "
                         f"{', '.join([*HONOURED_SETTINGS, *also])} (others only at the value /sdapi/v1/options shows)")


def check_setting_values(settings: dict, limits: Limits, backend: str) -> None:
    """Settings later requests read (/sdapi/v1/options): refused now, with the sentence a request would get, rather
    than at every request after them. A small txt2img and img2img request are made under them and checked."""
    probe = {"prompt": "", "steps": 1, "width": 64, "height": 64, "sampler_name": "Euler"}
    generation_request(Txt2ImgRequest(**probe), "txt2img", limits, settings, backend)
    init = encode_png(Image.new("RGB", (64, 64)))
    generation_request(Img2ImgRequest(**probe, init_images=[init]), "img2img", limits, settings, backend)


def _check_sampler_fields(req: ProcessingRequest) -> None:
    """sampler_name and the older sampler_index both sent: A1111 takes sampler_name; refuse if they disagree."""
    if {"sampler_name", "sampler_index"} <= req.model_fields_set and req.sampler_name:
        try:
            same = resolve_sampler(req.sampler_name) == resolve_sampler(req.sampler_index)
        except ValueError:
            return  # the unknown name gets GenerationRequest.check's sentence
        if not same:
            raise BadRequest(f"sampler_name {req.sampler_name!r} and sampler_index {req.sampler_index!r} name "
                             f"different samplers; send sampler_name alone")


def generation_request(req: ProcessingRequest, kind: str, limits: Limits, options: dict,
                       backend: str = "eager", styles_file: str | None = None,
                       controlnet_dir: str | None = None, upscalers_dir: str | None = None) -> GenerationRequest:
    """An A1111 txt2img or img2img request as plainsd's GenerationRequest, checked: the fields plainsd refuses, the
    server's own limits, then GenerationRequest.check's rules. options: the server's settings (/sdapi/v1/options),
    which a request's override_settings take precedence over, as A1111 applies them for the request; backend: what
    runs the server's UNet; styles_file: the server's styles, which the request's styles name; controlnet_dir: the
    server's ControlNet models, which the request's ControlNet units name; upscalers_dir: the server's upscaler
    models (hr_upscaler, SD upscale), run in tiles of A1111's ESRGAN_tile setting."""
    check_fields(req, options)
    overrides = req.override_settings or {}
    for name in TOKEN_MERGING:
        token_merging_ratio(overrides, name)
    settings = {**options, **overrides}
    clip_skip = clip_skip_setting(overrides)  # the request's, else the server's where it is not the last layer
    if clip_skip is None and (clip_skip_setting(options) or 1) > 1:
        clip_skip = options["CLIP_stop_at_last_layers"]
    sampler, schedule = sampler_and_schedule(req)
    request = GenerationRequest(
        prompt=_without_networks(req, req.prompt), negative_prompt=req.negative_prompt, steps=req.steps,
        sampler=sampler, schedule=schedule,
        cfg_scale=req.cfg_scale, guidance_until=req.guidance_until, seed=req.seed, width=req.width,
        height=req.height, batch_size=req.batch_size, batch_count=req.n_iter,
        clip_skip=clip_skip, fast=choose_fast(bool(req.fast), bool(req.tiny_decoder)),
        token_merging=_token_merging(settings, overrides, kind), **_noise_fields(req, settings, sampler),
        styles=list(req.styles or []), styles_file=styles_file, upscalers_dir=upscalers_dir,
        upscaler_tile=settings.get("ESRGAN_tile", 192), upscaler_tile_overlap=settings.get("ESRGAN_tile_overlap", 8),
        refiner_checkpoint=req.refiner_checkpoint if req.refiner_checkpoint not in ("", "None") else None,
        refiner_switch_at=req.refiner_switch_at)
    if kind == "img2img":
        request = _img2img(request, req, limits, settings)
    elif req.enable_hr:
        request = _hires(request, req, settings.get("token_merging_ratio_hr") or None)
    units = control_units(req, kind, limits, settings, controlnet_dir)
    request = request.replace(controlnet=tuple(unit.control for unit in units), controlnet_dir=controlnet_dir)
    _check_limits(request, limits)
    try:
        request.check(backend=backend)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    _check_hires_size(request, limits)
    return request


def control_units(req: ProcessingRequest, kind: str, limits: Limits, settings: dict,
                  controlnet_dir: str | None = None) -> list[controlnet.Unit]:
    """The ControlNet extension's enabled units in the request's alwayson_scripts, checked (one sentence naming the
    field); settings: the server's with the request's override_settings."""
    try:
        controlnet.check_settings(settings)
        return controlnet.units(req.alwayson_scripts, kind, lambda data, what: decode_image(data, what, limits),
                                lambda: controlnet.model_names(controlnet_dir), settings.get("control_net_unit_count", controlnet.SETTINGS["control_net_unit_count"]))
    except ValidationError as e:  # a unit's field of the wrong kind: named by its place in the request
        key = next(iter(req.alwayson_scripts))
        raise BadRequest(validation_sentence([{**error, "loc": _place("body", "alwayson_scripts", key, *error["loc"])}
                                              for error in e.errors()])) from None
    except ValueError as e:
        raise BadRequest(str(e)) from None


def _place(*loc) -> tuple:
    """A pydantic location with list indices written as the sentences write them: ("args", 0) -> ("args[0]",)."""
    out = []
    for part in loc:
        if isinstance(part, int) and out:
            out[-1] = f"{out[-1]}[{part}]"
        else:
            out.append(part)
    return tuple(out)


def _without_networks(req: ProcessingRequest, prompt: str) -> str:
    """A1111's disable_extra_networks: the prompt's <lora:...> tags removed and not applied."""
    return extract_loras(prompt)[0] if req.disable_extra_networks else prompt


def _noise_fields(req: ProcessingRequest, settings: dict, sampler: str) -> dict:
    """Variation seed, seed resize, tiling, ENSD and the samplers' eta and s_*: the request's fields, else the
    settings' (checked by GenerationRequest.check with the rest). An s_* setting applies where one of the run's
    samplers (the hires fix's too) takes it; eta_ancestral and eta_ddim go to the request whole, so that each
    pass's sampler takes the eta of its own kind, as in A1111."""
    hires = getattr(req, "hr_sampler_name", None) if getattr(req, "enable_hr", False) else None
    try:
        infos = [resolve_sampler(name)[0] for name in (sampler, hires) if name not in (None, "", "Use same sampler")]
    except ValueError as e:
        raise BadRequest(str(e)) from None
    fields = {"eta": req.eta}
    for name in ("s_churn", "s_tmin", "s_tmax", "s_noise"):
        value = getattr(req, name)
        if value is None and settings.get(name) is not None and any(takes(info, name) for info in infos):
            value = settings[name]
        fields[name] = value
    for name in ("eta_ancestral", "eta_ddim"):
        if settings.get(name) is not None:
            fields[name] = settings[name]
    ensd = settings.get("eta_noise_seed_delta") or 0
    if isinstance(ensd, bool) or not isinstance(ensd, int):
        raise BadRequest(f"eta_noise_seed_delta must be a whole number, got {ensd!r}")
    tiling = req.tiling if req.tiling is not None else settings.get("tiling", False)
    if not isinstance(tiling, bool):
        raise BadRequest(f"the tiling setting must be true or false, got {tiling!r}")
    return dict(fields, subseed=req.subseed, subseed_strength=req.subseed_strength,
                seed_resize_from_w=req.seed_resize_from_w, seed_resize_from_h=req.seed_resize_from_h,
                tiling=bool(tiling), eta_noise_seed_delta=ensd, randn_source=settings.get("randn_source", "GPU"),
                s_min_uncond=req.s_min_uncond if req.s_min_uncond is not None else settings.get("s_min_uncond", 0.0))


def script_plan(req: ProcessingRequest, kind: str, request: GenerationRequest, limits: Limits,
                checkpoints=None, backend: str = "eager") -> scripts.Prepared | None:
    """The script script_name names with its script_args checked (scripts.prepare), or None for none.
    Each request the script will run must keep the server's limits and run on its backend, and all of them
    together draw at most max_images pictures. checkpoints: the server's models and VAEs, for an X/Y/Z plot's
    Checkpoint name, Refiner checkpoint and VAE axes."""
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
        _check_limits(cell, limits)
        _check_hires_size(cell, limits)
        cell.check(backend=backend)

    try:
        return scripts.prepare(req.script_name, kind, request, req.script_args, scripts.Context(checkpoints, check))
    except ValueError as e:
        raise BadRequest(str(e)) from None


def _token_merging(settings: dict, overrides: dict, kind: str) -> float:
    """The first pass's ratio as A1111 chooses it (its settings with the request's overrides applied): for img2img
    the request's own ratio where it sets one, else img2img's ratio where that is not 0, else the ratio."""
    if kind == "img2img" and overrides.get("token_merging_ratio"):
        return float(overrides["token_merging_ratio"])
    own = settings.get("token_merging_ratio_img2img") if kind == "img2img" else 0.0
    return float(own or settings.get("token_merging_ratio") or 0.0)


def _check_limits(request: GenerationRequest, limits: Limits) -> None:
    """The server's own limits, on top of what any request must be (GenerationRequest.check)."""
    if not 8 <= min(request.width, request.height) or max(request.width, request.height) > limits.max_size:
        raise BadRequest(f"width and height must be between 8 and {limits.max_size}, got {request.width}x{request.height}")
    if request.steps > limits.max_steps:
        raise BadRequest(f"steps may be at most {limits.max_steps}, got {request.steps}")
    if request.batch_size * request.batch_count > limits.max_images:
        raise BadRequest(f"batch_size x n_iter may be at most {limits.max_images} images, "
                         f"got {request.batch_size} x {request.batch_count}")
    if max(request.seed_resize_from_w, request.seed_resize_from_h) > limits.max_size:
        raise BadRequest(f"seed_resize_from_w and seed_resize_from_h may be at most {limits.max_size}, got "
                         f"{request.seed_resize_from_w}x{request.seed_resize_from_h}")
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
    hires = HiresFix(scale=req.hr_scale, width=hr_x, height=hr_y, upscaler=req.hr_upscaler or "Latent",
                     steps=req.hr_second_pass_steps,
                     strength=HIRES_STRENGTH if req.denoising_strength is None else req.denoising_strength,
                     sampler=None if req.hr_sampler_name in (None, "", "Use same sampler") else req.hr_sampler_name,
                     schedule=None if req.hr_scheduler in (None, "", "Use same scheduler") else req.hr_scheduler,
                     prompt=_without_networks(req, req.hr_prompt) or None, negative_prompt=req.hr_negative_prompt or None,
                     token_merging=token_merging or None)
    return request.replace(hires=hires)


def _img2img(request: GenerationRequest, req: Img2ImgRequest, limits: Limits, settings: dict) -> GenerationRequest:
    """The init image, its denoising strength and resize mode, the noise multiplier (the request's, else A1111's
    setting of that name), and the mask's fields (used only with a mask, as in A1111)."""
    if not req.init_images:
        raise BadRequest("init_images must hold one base64-encoded image")
    request = request.replace(init_image=decode_image(req.init_images[0], "init_images[0]", limits).convert("RGB"),
                              strength=0.75 if req.denoising_strength is None else req.denoising_strength,
                              resize_mode=req.resize_mode)
    multiplier = req.initial_noise_multiplier
    if multiplier is None:
        multiplier = settings.get("initial_noise_multiplier", 1.0)
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)):
        raise BadRequest(f"initial_noise_multiplier must be a number from 0 to 1.5, got {multiplier!r}")
    request = request.replace(initial_noise_multiplier=float(multiplier))
    if not req.mask:
        if req.latent_mask:
            raise BadRequest("latent_mask needs a mask (inpainting); send mask as well, or leave latent_mask out")
        return request
    if req.inpainting_fill not in (0, 1, 2, 3) or isinstance(req.inpainting_fill, bool):
        raise BadRequest(f"inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing), "
                         f"got {req.inpainting_fill!r}")
    return request.replace(mask=decode_image(req.mask, "mask", limits),
                           mask_blur=req.mask_blur if req.mask_blur is not None else max(req.mask_blur_x, req.mask_blur_y),
                           inpainting_mask_invert=bool(req.inpainting_mask_invert),
                           inpainting_fill=INPAINTING_FILLS[req.inpainting_fill],
                           inpaint_full_res=req.inpaint_full_res,
                           inpaint_full_res_padding=req.inpaint_full_res_padding, mask_round=req.mask_round,
                           latent_mask=(decode_image(req.latent_mask, "latent_mask", limits) if req.latent_mask
                                        else None))


def echo(req: BaseModel, drop_images: bool = False) -> dict:
    """The request as A1111 echoes it in `parameters` (init images and mask left out unless asked for)."""
    out = req.model_dump()
    if drop_images:
        out["init_images"] = None
        out["mask"] = None
    return out


def info_json(req: ProcessingRequest, result, request: GenerationRequest, sd) -> str:
    """The API's `info`: A1111's processing fields, from the parameters the run used."""
    p = result.parameters
    n = len(result.images)
    info = {
        "prompt": p.prompt, "all_prompts": [p.prompt] * n,  # (styled, as A1111's)
        "negative_prompt": p.negative_prompt, "all_negative_prompts": [p.negative_prompt] * n,
        "seed": p.seed, "all_seeds": result.seeds, "subseed": p.subseed, "all_subseeds": result.subseeds,
        "subseed_strength": req.subseed_strength, "width": p.width, "height": p.height,
        "sampler_name": p.sampler, "scheduler": schedule_label(p.schedule), "cfg_scale": p.cfg_scale,
        "steps": p.steps, "batch_size": p.batch_size, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": p.model, "sd_model_hash": p.model_hash,
        "sd_vae_name": p.vae_name, "sd_vae_hash": p.vae_hash, "seed_resize_from_w": req.seed_resize_from_w,
        "seed_resize_from_h": req.seed_resize_from_h, "denoising_strength": p.denoising_strength,
        # (the ControlNet extension's units too, and NGMS where a call skipped the negative prompt, as A1111's)
        "extra_generation_params": {**p.sampler_fields, **p.controlnet, **({"NGMS": p.ngms} if p.ngms else {})},
        "index_of_first_image": 0, "infotexts": result.infotexts, "styles": req.styles or [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": p.clip_skip,
        "is_using_inpainting_conditioning": sd.config.unet.in_channels == 9 and request.init_image is not None,
        "version": "plainsd", "interrupted": result.interrupted,
        "notes": p.notes,  # (plainsd's: what the run did that the request did not say, as the CLI prints them)
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
