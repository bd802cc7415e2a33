"""A1111's "parameters" PNG text chunk: write it, read it back."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

# The order A1111 writes the fields in.
FIELDS = ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
          "Variation seed", "Variation seed strength", "Seed resize from",
          "Denoising strength", "Clip skip", "Mask blur", "ENSD", "Version")


def _quote(value) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def infotext(prompt: str, negative_prompt: str = "", **fields) -> str:
    """'prompt\\nNegative prompt: ...\\nSteps: 20, Sampler: ..., ...'; fields with no value are left out."""
    items = [(k, fields[k]) for k in FIELDS if fields.get(k) not in (None, "")]
    items += [(k, v) for k, v in fields.items() if k not in FIELDS and v not in (None, "")]
    line = ", ".join(f"{k}: {_quote(_number(v))}" for k, v in items)
    out = prompt
    if negative_prompt:
        out += f"\nNegative prompt: {negative_prompt}"
    return out + "\n" + line


_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict:
    """The inverse of infotext(): {'Prompt': ..., 'Negative prompt': ..., 'Steps': '20', ...} (values as strings)."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    if len(_PAIR.findall(last)) < 3:  # not a parameters line: everything is prompt
        lines.append("")
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines[:-1]:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].lstrip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PAIR.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        out[key.strip()] = value
    return out


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str | None,
             texts: dict[str, str] | None = None) -> Path:
    """Write a PNG with the parameters chunk (and further text chunks, e.g. Extras' "postprocessing"), through a
    temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = PngImagePlugin.PngInfo()
    for key, text in {"parameters": parameters, **(texts or {})}.items():
        if text:
            meta.add_text(key, text)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_parameters(path_or_image) -> str | None:
    """The parameters text of a PNG (or of a JPEG/WebP's EXIF comment, where A1111 puts it), if any."""
    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    text = image.info.get("parameters")
    if text is None and "exif" in image.info:
        try:
            comment = image.getexif().get_ifd(0x8769).get(0x9286)
            if isinstance(comment, bytes):
                comment = comment[8:].decode("utf-16-be" if comment.startswith(b"UNICODE") else "latin-1", "ignore")
            text = comment or None
        except Exception:  # EXIF parsing is best effort: a missing comment is not an error
            text = None
    return text


def add_fields(text: str, **fields) -> str:
    """An infotext with more fields at the end of its parameters line (fields with no value left out), as A1111's
    scripts add theirs (the X/Y/Z plot's "Script", "X Type", ...)."""
    extra = ", ".join(f"{k}: {_quote(_number(v))}" for k, v in fields.items() if v not in (None, ""))
    return f"{text}, {extra}" if extra else text


def parse_controlnet_units(fields: dict) -> list[dict]:
    """The A1111 ControlNet extension's "ControlNet 0", "ControlNet 1", ... entries of parsed infotext fields ->
    one dict per unit, keys as the extension's unit fields (module, model, weight, resize_mode, ...), values read
    as it reads them: True / False, whole numbers, other numbers, else text."""
    units = []
    for key in sorted((k for k in fields if re.fullmatch(r"ControlNet \d+", k)), key=lambda k: int(k.split()[1])):
        unit = {}
        for item in fields[key].split(","):
            name, _, value = item.strip().partition(": ")
            unit[name.lower().replace(" ", "_")] = _value(value)
        units.append(unit)
    return units


def _value(text: str):
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
