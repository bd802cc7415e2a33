"""A1111's `infotext` request field (modules/api/api.py, apply_infotext): a picture's parameters text read into
the request, as A1111's API reads it. Each label fills its request field where the request leaves that field
unset, and each label of an A1111 setting fills override_settings where those leave the setting unset; a
missing Clip skip or RNG is A1111's default (its parse_generation_parameters). A1111 keeps its model whatever
the infotext's is (its disable_weights_auto_swap, on by default), and so does plainsd. Unlike A1111's API,
plainsd reads an img2img infotext's prompts, size, CFG scale and denoising strength too, and its own labels.
What plainsd does not act on is said in the answer's notes rather than dropped unsaid.
"""

from __future__ import annotations

from pydantic import ValidationError

from plainsd.pnginfo import parse_infotext

from . import api


def _flag(text: str) -> bool:
    if text not in ("True", "False"):
        raise ValueError(f"a flag is True or False, got {text!r}")
    return text == "True"


# infotext label -> (request field, type): A1111's paste fields with an api name
FIELDS = {
    "Prompt": ("prompt", str), "Negative prompt": ("negative_prompt", str), "Steps": ("steps", int),
    "Sampler": ("sampler_name", str), "Schedule type": ("scheduler", str), "CFG scale": ("cfg_scale", float),
    "Seed": ("seed", int), "Batch size": ("batch_size", int), "Variation seed": ("subseed", int),
    "Variation seed strength": ("subseed_strength", float), "Denoising strength": ("denoising_strength", float),
    "Refiner": ("refiner_checkpoint", str), "Refiner switch at": ("refiner_switch_at", float),
    # plainsd's own
    "Guidance until": ("guidance_until", float), "DeepCache interval": ("fast", lambda text: True),
    "Decoder": ("tiny_decoder", lambda text: text == "TAESD"),
}
HIRES_FIELDS = {  # txt2img's hires fix
    "Hires upscale": ("hr_scale", float), "Hires upscaler": ("hr_upscaler", str),
    "Hires steps": ("hr_second_pass_steps", int), "Hires sampler": ("hr_sampler_name", str),
    "Hires schedule type": ("hr_scheduler", str), "Hires prompt": ("hr_prompt", str),
    "Hires negative prompt": ("hr_negative_prompt", str),
}
# "WxH" labels -> their two fields
SIZES = {"Size": ("width", "height"), "Seed resize from": ("seed_resize_from_w", "seed_resize_from_h")}
HIRES_SIZES = {"Hires resize": ("hr_resize_x", "hr_resize_y")}
# infotext label -> (A1111 setting, type): the settings whose OptionInfo names that label
SETTINGS = {
    "Clip skip": ("CLIP_stop_at_last_layers", int), "ENSD": ("eta_noise_seed_delta", int), "RNG": ("randn_source", str),
    "Eta": ("eta_ancestral", float), "Eta DDIM": ("eta_ddim", float), "Sigma churn": ("s_churn", float),
    "Sigma tmin": ("s_tmin", float), "Sigma tmax": ("s_tmax", float), "Sigma noise": ("s_noise", float),
    "Token merging ratio": ("token_merging_ratio", float), "Token merging ratio hr": ("token_merging_ratio_hr", float),
    "Tiling": ("tiling", _flag), "NGMS": ("s_min_uncond", float),
    "Noise multiplier": ("initial_noise_multiplier", float),
}
# labels that say what drew the picture and set nothing (the model's is compared: model_note)
DESCRIBING = {"Model", "Model hash", "VAE hash", "Version", "Lora hashes", "TI hashes", "Hashes"}


def apply(req: api.ProcessingRequest, kind: str, vaes: dict) -> tuple[api.ProcessingRequest, list[str], dict]:
    """The request with its infotext read in (the field kept, as A1111 echoes it), the notes on what was not
    applied, and the infotext's labels. vaes: the server's VAEs by name (an infotext's VAE is used where it is one of them)."""
    params = {"Clip skip": "1", "RNG": "GPU", **parse_infotext(req.infotext)}
    given = set(req.model_fields_set)
    fields, sizes = dict(FIELDS), dict(SIZES)
    if kind == "txt2img":
        fields.update(HIRES_FIELDS)
        sizes.update(HIRES_SIZES)
    update, settings, skipped = {}, dict(req.override_settings or {}), []
    for label, text in params.items():
        try:
            if label in fields:
                name, cast = fields[label]
                if name not in given and (text or label in ("Prompt", "Negative prompt")):
                    update[name] = cast(text)
            elif label in sizes:
                names = sizes[label]
                values = [int(v) for v in text.split("x")]
                if len(values) != 2:
                    raise ValueError(f"a size is WxH, got {text!r}")
                update.update({n: v for n, v in zip(names, values) if n not in given})
            elif label in SETTINGS:
                name, cast = SETTINGS[label]
                settings.setdefault(name, cast(text))
            elif label == "VAE" and "sd_vae" not in settings:
                if text in vaes:
                    settings["sd_vae"] = text
                else:
                    skipped.append(f"VAE ({text}: not among the server's VAEs)")
            elif label not in DESCRIBING and label != "VAE":
                skipped.append(label)
        except ValueError as e:
            raise api.BadRequest(f"infotext: its {label} {text!r} is not a value plainsd reads ({e})") from None
    if kind == "txt2img" and "enable_hr" not in given and "Denoising strength" in params and any(
            label in params for label in ("Hires upscale", "Hires upscaler", "Hires resize")):
        update["enable_hr"] = True  # (A1111's paste rule for its Hires. fix switch)
    if settings:
        update["override_settings"] = settings
    if "sampler_name" in update:
        given.discard("sampler_index")  # (A1111 takes sampler_name before sampler_index)
    try:
        req = type(req).model_validate({**{n: getattr(req, n) for n in given}, **update})
    except ValidationError as e:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in e.errors()]
        raise api.BadRequest(f"infotext: {api.validation_sentence(errors)}") from None
    notes = [f"the infotext's {', '.join(skipped)} were not applied: plainsd does not act on them"] if skipped else []
    return req, notes, params


def model_note(params: dict, title: str, model_hash: str | None) -> list[str]:
    """A note where the infotext's picture was drawn by another model than this one (title, its short hash)."""
    theirs = params.get("Model hash")
    if not theirs or model_hash is None or theirs == model_hash:
        return []
    return [f"the infotext's picture was drawn by the model {params.get('Model', '')} [{theirs}], this one by "
            f"{title} (as in A1111, an infotext does not switch models)"]
