"""A1111's ControlNet extension (Mikubill/sd-webui-controlnet) as its clients speak it: the units a txt2img or
img2img request carries in `alwayson_scripts: {"controlnet": {"args": [unit, ...]}}`, mapped onto
request.ControlUnit; the detected maps the extension appends to the answer's images; the answers of its
/controlnet/* routes.

Every field of the extension's unit (its internal_controlnet/args.py ControlNetUnit, with its defaults, and the
older spellings input_image, guidance, lowvram and mask_image it still takes) is honoured, or accepted only at the
value that asks for nothing and refused naming it otherwise (UNIT_NOT_SUPPORTED). A field the extension does not
have is refused (the extension drops it unread). Where the extension replaces a value it cannot use by the
module's default, plainsd does so only for what the extension documents as "default": a negative processor_res
or threshold; a threshold for a module that has no such slider is not used, as in the extension.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Optional, Union

from PIL import Image
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema

from plainsd import control, detectors, pipeline
from plainsd.request import CONTROL_MODES, ControlUnit

API_VERSION = 3   # what the extension's /controlnet/version answers (its external_code.get_api_version)
# the extension's settings (A1111's options) that requests and routes read, with the extension's defaults
SETTINGS = {"control_net_unit_count": 3, "control_net_no_detectmap": False}
MAX_UNIT_COUNT = 10   # the extension's slider for control_net_unit_count goes from 1 to 10

# the extension's older names of its resize modes, which it still takes (as detectors.resize_mode_name does)
RESIZE_ALIASES = ("Inner Fit (Scale to Fit)", "Outer Fit (Shrink to Fit)", "Scale to Fit (Inner Fit)",
                  "Envelope (Outer Fit)")



def _choice(names: tuple[str, ...], numbers: int, what: str, shown: tuple[str, ...]):
    """A field that takes one of the extension's names, or its number (0 to numbers - 1), as the extension does."""
    def check(value):
        if isinstance(value, bool) or value not in names and value not in range(numbers):
            raise ValueError(f"unknown {what} {value!r}; the extension's are {', '.join(shown)} (or 0 to "
                             f"{numbers - 1})")
        return value
    schema = {"anyOf": [{"enum": list(names)}, {"type": "integer", "minimum": 0, "maximum": numbers - 1}]}
    return Annotated[Union[str, int], AfterValidator(check), WithJsonSchema(schema)]


ResizeMode = _choice((*detectors.RESIZE_MODES, *RESIZE_ALIASES), 4, "resize mode", detectors.RESIZE_MODES)
ControlMode = _choice(CONTROL_MODES, 3, "control mode", CONTROL_MODES)


def _image_form(value):
    """A unit's image in one of the extension's forms (checked before anything is decoded): base64, a dict
    {"image": base64, "mask": base64 or null}, [image, mask], or a list of such dicts."""
    def is_dict(x):
        return isinstance(x, dict) and isinstance(x.get("image"), str) and set(x) <= {"image", "mask"} and (
            x.get("mask") is None or isinstance(x["mask"], str))
    if value is None or isinstance(value, str) or is_dict(value):
        return value
    if isinstance(value, list) and (all(is_dict(x) for x in value) if value and isinstance(value[0], dict) else
                                    len(value) == 2 and isinstance(value[0], str) and
                                    (value[1] is None or isinstance(value[1], str))):
        return value
    raise ValueError(f"the extension takes a control image as base64, {{\"image\": ..., \"mask\": ...}}, [image, mask] "
                     f"or a list of such dicts, got {_show(value)[:60]}")


_IMAGE_DICT = {"type": "object", "properties": {"image": {"type": "string"}, "mask": {"type": ["string", "null"]}},
               "required": ["image"], "additionalProperties": False}
ImageField = Annotated[Any, AfterValidator(_image_form), WithJsonSchema({"anyOf": [
    {"type": "string"}, {"type": "null"}, _IMAGE_DICT, {"type": "array", "items": _IMAGE_DICT, "minItems": 1},
    {"type": "array", "prefixItems": [{"type": "string"}, {"type": ["string", "null"]}], "minItems": 2,
     "maxItems": 2}]})]


class ControlNetUnitArgs(BaseModel):
    """One unit of alwayson_scripts.controlnet.args, with the extension's fields and defaults (a unit that leaves
    `enabled` out is off, as in the extension)."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = False
    module: str = Field("none", description="a preprocessor from /controlnet/module_list (name or alias)")
    model: str = Field("None", description="a model from /controlnet/model_list")
    weight: float = Field(1.0, ge=0.0, le=2.0)
    image: ImageField = Field(None, description="base64 (or a data: URL); None in img2img: the init image")
    resize_mode: ResizeMode = "Crop and Resize"
    low_vram: bool = Field(False, description="accepted; it saves GPU memory, and plainsd runs on the CPU")
    processor_res: int = Field(-1, description="the preprocessor's resolution; negative: the module's default")
    threshold_a: float = Field(-1, description="the preprocessor's first slider; negative: its default")
    threshold_b: float = Field(-1, description="the preprocessor's second slider; negative: its default")
    guidance_start: float = Field(0.0, ge=0.0, le=1.0)
    guidance_end: float = Field(1.0, ge=0.0, le=1.0)
    pixel_perfect: bool = False
    control_mode: ControlMode = "Balanced"
    save_detected_map: bool = Field(True, description="the detected map is appended to the answer's images")
    # the extension's older spellings of image, guidance_end, low_vram and mask
    input_image: ImageField = None
    guidance: Optional[float] = Field(None, ge=0.0, le=1.0)
    lowvram: Optional[bool] = None
    mask_image: Optional[str] = None
    # accepted at these defaults only (UNIT_NOT_SUPPORTED says why)
    mask: Optional[str] = None
    is_ui: bool = False
    input_mode: Literal["simple", "batch", "merge"] = "simple"
    batch_images: Optional[Union[str, list]] = None
    output_dir: str = ""
    loopback: bool = False
    inpaint_crop_input_image: bool = True
    hr_option: Literal["Both", "Low res only", "High res only"] = "Both"
    advanced_weighting: Optional[list[float]] = None
    effective_region_mask: Optional[str] = None
    pulid_mode: Literal["Fidelity", "Extremely style"] = "Fidelity"
    union_control_type: Literal["OpenPose", "Depth", "Soft Edge", "Hard Edge", "Normal Map", "Segmentation", "Tile",
                                "Inpaint", "Unknown"] = "Unknown"
    ipadapter_input: Optional[Union[str, list[str]]] = None
    batch_mask_dir: Optional[str] = None
    animatediff_batch: bool = False
    batch_modifiers: list = Field(default_factory=list)
    batch_image_files: list = Field(default_factory=list)
    batch_keyframe_idx: Optional[Union[str, list]] = None


class ControlNetArgs(BaseModel):
    """alwayson_scripts.controlnet: A1111 hands `args` to the extension, one unit each."""
    model_config = ConfigDict(extra="forbid")
    args: list[ControlNetUnitArgs] = Field(default_factory=list)


# A unit's fields that ask for what plainsd does not do: accepted at these values only (the extension's default and
# its spellings of "nothing"), refused with the reason otherwise
UNIT_NOT_SUPPORTED = {
    "mask": ((None, ""), "plainsd's units take no mask over the control image (the extension's inpaint and CLIP "
                         "preprocessors use one)"),
    "is_ui": ((False,), "it marks units of the extension's own page"),
    "input_mode": (("simple",), "plainsd takes one control image per unit (batch and merge read the extension "
                                "page's folders)"),
    "batch_images": ((None, ""), "plainsd takes one control image per unit"),
    "output_dir": (("",), "plainsd takes one control image per unit"),
    "loopback": ((False,), "plainsd takes one control image per unit"),
    "inpaint_crop_input_image": ((True,), "plainsd crops a unit's image as the extension does by default"),
    "hr_option": (("Both",), "plainsd applies a unit to both passes of the hires fix"),
    "advanced_weighting": ((None,), "plainsd weighs a unit's residuals by its weight and control mode only"),
    "effective_region_mask": ((None, ""), "plainsd applies a unit to the whole picture"),
    "pulid_mode": (("Fidelity",), "it is for PuLID, which plainsd does not load"),
    "union_control_type": (("Unknown",), "it is for ControlNet union models, which plainsd does not load"),
    "ipadapter_input": ((None,), "it is for IP-Adapter, which plainsd does not load"),
    "batch_mask_dir": ((None, ""), "it is for AnimateDiff, which plainsd does not have"),
    "animatediff_batch": ((False,), "it is for AnimateDiff, which plainsd does not have"),
    "batch_modifiers": (([],), "it is for AnimateDiff, which plainsd does not have"),
    "batch_image_files": (([],), "it is for AnimateDiff, which plainsd does not have"),
    "batch_keyframe_idx": ((None,), "it is for AnimateDiff, which plainsd does not have"),
}
# the older spellings: (older, current)
ALIASES = (("input_image", "image"), ("guidance", "guidance_end"), ("lowvram", "low_vram"), ("mask_image", "mask"))


def alwayson_schema() -> dict:
    """alwayson_scripts as the OpenAPI schema states it: the ControlNet extension's units (other scripts are
    refused with a sentence)."""
    unit = ControlNetUnitArgs.model_json_schema()
    controlnet = {"type": "object", "properties": {"args": {"type": "array", "items": unit}},
                  "additionalProperties": False}
    return {"type": "object", "properties": {"controlnet": controlnet}, "additionalProperties": True}


def saves(scripts: dict) -> list[bool]:
    """save_detected_map of each enabled unit of a request's alwayson_scripts (checked already: units)."""
    args = [ControlNetArgs.model_validate(value).args for value in scripts.values()]
    return [arg.save_detected_map for found in args for arg in found if arg.enabled]


@dataclass(frozen=True)
class Unit:
    """An enabled unit: what the pipeline draws with, and whether its detected map goes into the answer."""
    control: ControlUnit
    save_detected_map: bool = True


def units(scripts: dict, kind: str, decode: Callable[[Any, str], Image.Image], models: Callable[[], list[str]],
          unit_count: int = SETTINGS["control_net_unit_count"]) -> list[Unit]:
    """alwayson_scripts of a txt2img or img2img request -> its enabled ControlNet units, checked (ValueError with
    one sentence; a pydantic ValidationError for a field of the wrong kind, whose locations start at the unit).
    decode(data, what): a base64 image -> PIL image; models(): the ControlNet models' names (model_names)."""
    others = [name for name in scripts if str(name).lower() != "controlnet"]
    if others:
        raise ValueError(f"alwayson_scripts asks for {', '.join(map(str, others))}; plainsd has only the ControlNet "
                         f"extension's (\"controlnet\": {{\"args\": [unit, ...]}})")
    if len(scripts) > 1:
        raise ValueError(f"alwayson_scripts names the ControlNet extension twice ({', '.join(scripts)}); send one")
    if not scripts:
        return []
    key = next(iter(scripts))
    args = ControlNetArgs.model_validate(scripts[key]).args
    if len(args) > unit_count:
        raise ValueError(f"alwayson_scripts.{key}.args holds {len(args)} units; the extension takes at most "
                         f"control_net_unit_count ({unit_count}), a setting (/sdapi/v1/options) of 1 to "
                         f"{MAX_UNIT_COUNT}")
    found = []
    for i, arg in enumerate(args):
        where = f"alwayson_scripts.{key}.args[{i}]"
        module = _module_name(arg.module, f"{where}.module")  # (disabled units' too, as the extension checks)
        if arg.enabled:
            found.append(_unit(arg, module, where, kind, decode, models))
    return found


def _unit(arg: ControlNetUnitArgs, module: str, where: str, kind: str, decode,
          models: Callable[[], list[str]]) -> Unit:
    """One enabled unit as a ControlUnit: older spellings, images, names and the "default" values resolved."""
    values = _without_aliases(arg, where)
    for name, (nothing, reason) in UNIT_NOT_SUPPORTED.items():
        if values[name] not in nothing:
            raise ValueError(f"{where}.{name}: {reason}, so only {' or '.join(map(_show, nothing))} is accepted "
                             f"here, got {_show(values[name])}")
    if values["guidance_start"] > values["guidance_end"]:
        raise ValueError(f"{where}: guidance_start ({values['guidance_start']}) is after guidance_end "
                         f"({values['guidance_end']}); the unit acts from guidance_start to guidance_end")
    image = _image(values["image"], f"{where}.image", decode)
    if image is None and kind != "img2img":
        raise ValueError(f"{where}.image: the unit has no control image; send one (base64), or use img2img, where a "
                         f"unit without one uses the init image (resized as img2img's resize_mode says)")
    info = detectors.MODULES[module]
    control = ControlUnit(
        model=find_model(values["model"], models(), f"{where}.model"), image=image, module=module,
        weight=values["weight"], guidance_start=values["guidance_start"], guidance_end=values["guidance_end"],
        control_mode=values["control_mode"] if isinstance(values["control_mode"], str)
        else CONTROL_MODES[values["control_mode"]],
        resize_mode=detectors.resize_mode_name(values["resize_mode"]),
        processor_res=values["processor_res"] if values["processor_res"] >= 0 else _default_resolution(info),
        threshold_a=_threshold(values["threshold_a"], _slider(info, "a")),
        threshold_b=_threshold(values["threshold_b"], _slider(info, "b")),
        pixel_perfect=values["pixel_perfect"])
    return Unit(control, values["save_detected_map"])


def _without_aliases(arg: ControlNetUnitArgs, where: str) -> dict:
    """The unit's fields with the older spellings moved to the current names (both sent: refused, as the
    extension refuses them)."""
    values = arg.model_dump()
    for old, new in ALIASES:
        if values[old] is not None:  # (null: not sent)
            if new in arg.model_fields_set:
                raise ValueError(f"{where}: {old} and {new} are the same field (the extension's older and current "
                                 f"names); send {new} alone")
            values[new] = values[old]
    return values


def _image(data, what: str, decode) -> Image.Image | None:
    """A unit's image in any of the extension's forms: base64, {"image": ..., "mask": ...}, [image, mask] or a list
    of one such dict; an image with transparency is put on white, as the extension's HWC3 does."""
    if isinstance(data, list):
        if len(data) == 2 and not any(isinstance(x, dict) for x in data):
            data = {"image": data[0], "mask": data[1]}
        elif len(data) == 1 and isinstance(data[0], dict):
            data = data[0]
        else:
            raise ValueError(f"{what} holds {len(data)} images; plainsd takes one control image per unit (several are "
                             f"for the extension's IP-Adapter)")
    if isinstance(data, dict):  # (its keys checked: _image_form)
        if data.get("mask"):
            raise ValueError(f"{what}.mask: {UNIT_NOT_SUPPORTED['mask'][1]}; send null")
        data = data["image"]
    if data is None or data == "":
        return None
    image = decode(data, what)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return image.convert("RGB")


def _show(value) -> str:
    return json.dumps(value)


# --- the models -------------------------------------------------------------------------------------------

def model_names(folder=None) -> list[str]:
    """The ControlNet models a server offers, as the extension lists them ("name [hash]"): the shipped one and
    those of its ControlNet folder."""
    return list(control.controlnet_titles(folder))


def find_model(name: str, models: list[str], what: str = "model") -> str:
    """The extension's lookup of a unit's model among the listed names ("name [hash]"): the name itself, the file
    stem in any case, else the shortest name that contains it. Only listed names are ever used, so a client never
    names a file of its own choosing."""
    if name in (None, "", "None"):
        raise ValueError(f"{what}: the unit names no ControlNet model (\"None\"); /controlnet/model_list lists them")
    if name in models:
        return name
    stems = {_stem(m).lower(): m for m in models}
    wanted = _stem(name).lower()
    if wanted in stems:
        return stems[wanted]
    containing = sorted((s for s in stems if name.lower() in s), key=len)
    if containing:
        return stems[containing[0]]
    listed = ", ".join(models) if models else "none (put ControlNet files in the folder of --controlnet-dir)"
    raise ValueError(f"{what}: unknown ControlNet model {name!r}; the server has {listed}")


def _stem(name: str) -> str:
    """"name [hash]" -> "name"."""
    return name.split(" [")[0].strip()


# --- the modules (preprocessors) ------------------------------------------------------------------------------

def _module_name(value: str, what: str) -> str:
    """A module by name or by the extension's alias (its label) -> its name in detectors.MODULES."""
    for name, info in detectors.MODULES.items():
        if value in (name, _label(name, info)):
            return name
    raise ValueError(f"{what}: unknown preprocessor {value!r}; /controlnet/module_list lists them")


def _label(name: str, info) -> str:
    return getattr(info, "label", None) or name


def _default_resolution(info) -> int:
    slider = getattr(info, "resolution", None)
    return int(slider.value) if slider is not None else 512


def _slider(info, which: str):
    return getattr(info, f"threshold_{which}", None)


def _threshold(value: float, slider) -> float | None:
    """A unit's threshold: None (the module's default) where negative, or where the module has no such slider."""
    return None if value < 0 or slider is None else value


def _sliders(info) -> list[dict]:
    """A module's sliders as the extension's module_detail gives them: resolution, then the thresholds."""
    out = []
    for slider in (getattr(info, "resolution", None), _slider(info, "a"), _slider(info, "b")):
        if slider is not None:
            out.append({"name": slider.label, "value": slider.value, "min": slider.minimum, "max": slider.maximum,
                        "step": slider.step})
    return out


def _runnable() -> list[str]:
    """The modules plainsd runs, in the extension's order: none first."""
    names = [name for name, info in detectors.MODULES.items() if not getattr(info, "needs_weights", False)]
    return sorted(names, key=lambda name: name != "none")


def module_list(alias_names: bool = False) -> dict:
    """/controlnet/module_list: the modules by name (or by alias, the extension's labels) and their sliders."""
    names = _runnable()
    shown = [_label(name, detectors.MODULES[name]) if alias_names else name for name in names]
    detail = {shown_name: {"model_free": False, "sliders": _sliders(detectors.MODULES[name])}
              for shown_name, name in zip(shown, names)}
    return {"module_list": shown, "module_detail": detail}


# --- /controlnet/detect -------------------------------------------------------------------------------------

class DetectRequest(BaseModel):
    """The body of the extension's /controlnet/detect, with its defaults."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list, description="base64 images")
    controlnet_processor_res: int = Field(-1, description="negative: the module's default")
    controlnet_threshold_a: float = Field(-1, description="negative: the module's default")
    controlnet_threshold_b: float = Field(-1, description="negative: the module's default")
    controlnet_masks: list[str] = Field(default_factory=list, description="accepted empty only")
    low_vram: bool = Field(False, description="accepted; it saves GPU memory, and plainsd runs on the CPU")


def detect(req: DetectRequest, decode: Callable[[Any, str], Image.Image]) -> list[Image.Image]:
    """The detected maps of /controlnet/detect, one per input image, at the processor resolution."""
    module = _module_name(req.controlnet_module, "controlnet_module")
    if not req.controlnet_input_images:
        raise ValueError("controlnet_input_images is empty; send the images to detect (base64)")
    if req.controlnet_masks:
        raise ValueError("controlnet_masks: plainsd's preprocessors take no mask (the extension's inpaint "
                         "preprocessors do); send an empty list")
    info = detectors.MODULES[module]
    resolution = req.controlnet_processor_res if req.controlnet_processor_res >= 0 else _default_resolution(info)
    ta = _threshold(req.controlnet_threshold_a, _slider(info, "a"))
    tb = _threshold(req.controlnet_threshold_b, _slider(info, "b"))
    images = [_image(data, f"controlnet_input_images[{i}]", decode) for i, data in enumerate(req.controlnet_input_images)]
    return [detectors.detect(module, image, resolution, ta, tb) for image in images]


# --- the detected maps of a generation ---------------------------------------------------------------------------

def detected_maps(request, saved: list[bool], settings: dict) -> list[Image.Image]:
    """The pictures the extension appends to the answer's images after the drawn ones: for each of the request's
    units whose save_detected_map is on (saved, from saves), its hint as the UNet gets it (with the hires fix, the
    second pass's, then the first pass's); none where the setting control_net_no_detectmap is on."""
    if settings.get("control_net_no_detectmap"):
        return []
    maps = []
    for unit, save in zip(request.controlnet, saved, strict=True):
        if save:
            maps += _hints(request, unit)
    return maps


def _hints(request, unit: ControlUnit) -> list[Image.Image]:
    """A unit's detected map at each pass's size, as the pipeline fits it (control.detected_map, detectors.fit;
    with inpainting's "only masked", of the picture cut to the mask's box, as the pipeline cuts it)."""
    area = pipeline._masked_area(request) if request.mask is not None and request.inpaint_full_res else None
    detected, resize = control.detected_map(unit, request, area.box if area is not None else None)
    w, h = request.width, request.height
    sizes = ([request.hires.final_size(w, h)] if request.hires is not None else []) + [(w, h)]
    return [detectors.fit(detected, width, height, resize) for width, height in sizes]


def check_settings(settings: dict) -> None:
    """The extension's settings a request reads (the server's, with the request's override_settings)."""
    count = settings.get("control_net_unit_count", SETTINGS["control_net_unit_count"])
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_UNIT_COUNT:
        raise ValueError(f"control_net_unit_count must be a whole number from 1 to {MAX_UNIT_COUNT}, got {count!r}")
    if not isinstance(settings.get("control_net_no_detectmap", False), bool):
        raise ValueError(f"control_net_no_detectmap must be true or false, got {settings['control_net_no_detectmap']!r}")
