"""A1111's scripts, as its API reaches them (script_name, script_args): the ones plainsd runs, for txt2img and img2img.

    run = prepare("x/y/z plot", "txt2img", request, script_args)   # the name and arguments checked (ValueError)
    result = run(engine)          # a pipeline.Result: the script's images and infotexts

A script is one entry of SCRIPTS: its name as A1111 matches script_name (its title in lower case), the tabs it
serves, its arguments in A1111's script_args order (what /sdapi/v1/script-info lists), prepare and run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

from . import xyz
from .images import INPAINTING_FILLS, inpainting_fill
from .pipeline import generate, outpaint_request
from .request import GenerationRequest
from .xyz import Checkpoints, XYZSettings


@dataclass(frozen=True)
class ScriptArg:
    """One of a script's arguments as A1111's /sdapi/v1/script-info describes it (its UI control)."""
    label: str
    value: Any = None
    minimum: Any = None
    maximum: Any = None
    step: Any = None
    choices: list | None = None


@dataclass
class Context:
    """What a script may need besides the request: the models a Checkpoint name axis chooses among, and a check
    of every request it will run (e.g. a server's limits; ValueError)."""
    checkpoints: Checkpoints | None = None
    check: Callable[[GenerationRequest], None] | None = None


@dataclass(frozen=True)
class Script:
    name: str                                  # A1111's title in lower case, as script_name is matched
    kinds: tuple[str, ...]                     # "txt2img", "img2img"
    args: Callable[[str], list[ScriptArg]]     # its script_args for a tab, in order, with their defaults
    prepare: Callable[[GenerationRequest, list, str, Context], Any]   # script_args checked -> a plan (ValueError)
    run: Callable[..., Any]                    # run(engine, plan, context, **pipeline controls) -> pipeline.Result


def _xyz_args(kind: str) -> list[ScriptArg]:
    labels = xyz.axis_labels(kind)
    out = []
    for letter, default in (("X", "Seed"), ("Y", "Nothing"), ("Z", "Nothing")):
        out += [ScriptArg(f"{letter} type", default, choices=labels), ScriptArg(f"{letter} values", ""),
                ScriptArg(f"{letter} values", None)]
    out += [ScriptArg("Draw legend", True), ScriptArg("Include Sub Images", False),
            ScriptArg("Include Sub Grids", False), ScriptArg("Keep -1 for seeds", False),
            ScriptArg("Vary seeds for X", False), ScriptArg("Vary seeds for Y", False),
            ScriptArg("Vary seeds for Z", False), ScriptArg("Grid margins (px)", 0, 0, 500, 2),
            ScriptArg("Use text inputs instead of dropdowns", False)]
    return out


def _xyz_prepare(request: GenerationRequest, args: list, kind: str, context: Context) -> xyz.Plot:
    return xyz.plan(request, XYZSettings.from_script_args(args), kind, context.checkpoints, context.check)


def _xyz_run(engine, plan: xyz.Plot, context: Context, **controls):
    return xyz.run(engine, plan, context.checkpoints, **controls)


OUTPAINT_DIRECTIONS = {"left": "left", "right": "right", "up": "top", "down": "bottom"}  # A1111's -> the side


def _outpaint_args(kind: str) -> list[ScriptArg]:
    return [ScriptArg("Pixels to expand", 128, 8, 256, 8), ScriptArg("Mask blur", 4, 0, 64, 1),
            ScriptArg("Masked content", "fill", choices=list(INPAINTING_FILLS)),
            ScriptArg("Outpainting direction", list(OUTPAINT_DIRECTIONS), choices=list(OUTPAINT_DIRECTIONS))]


def _whole(value, what: str, least: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a slider's 128.0
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"poor man's outpainting's {what} must be a whole number, {least} or more, got {value!r}")
    return value


def _outpaint_prepare(request: GenerationRequest, args: list, kind: str, context: Context) -> GenerationRequest:
    """A1111's script_args [pixels, mask blur, masked content (0-3 or its name), directions] checked, and the
    request made into the outpainting of its init image (pipeline.outpaint_request), drawn in one pass."""
    labels = [a.label for a in _outpaint_args(kind)]
    if not isinstance(args, list) or len(args) > len(labels):
        raise ValueError(f"poor man's outpainting takes up to {len(labels)} script_args ({', '.join(labels)}), "
                         f"got {args!r}")
    pixels, mask_blur, fill, directions = [*args, *(a.value for a in _outpaint_args(kind)[len(args):])]
    pixels = _whole(pixels, "Pixels to expand (script_args[0])", 1)
    mask_blur = _whole(mask_blur, "Mask blur (script_args[1])", 0)
    try:
        fill = inpainting_fill(fill)
    except ValueError:
        raise ValueError(f"poor man's outpainting's Masked content (script_args[2]) must be 0 (fill), 1 (original), "
                         f"2 (latent noise) or 3 (latent nothing), got {fill!r}") from None
    known = ", ".join(OUTPAINT_DIRECTIONS)
    if not isinstance(directions, list) or not directions or any(d not in OUTPAINT_DIRECTIONS for d in directions):
        raise ValueError(f"poor man's outpainting's Outpainting direction (script_args[3]) must be a list of one or "
                         f"more of {known}, got {directions!r}")
    if request.init_image is None:
        raise ValueError("poor man's outpainting needs an init image (init_images) to extend")
    if request.mask is not None:
        raise ValueError("poor man's outpainting makes its own mask of the new area; leave out mask")
    if request.batch_size * request.batch_count != 1:
        raise ValueError("poor man's outpainting draws one picture, as A1111's; leave batch_size and n_iter at 1")
    sides = {side: pixels if direction in directions else 0 for direction, side in OUTPAINT_DIRECTIONS.items()}
    outpainted = outpaint_request(request, request.init_image, **sides, mask_blur=mask_blur, inpainting_fill=fill)
    try:
        outpainted.check()
        if context.check is not None:
            context.check(outpainted)
    except ValueError as e:
        raise type(e)(f"poor man's outpainting's canvas of {outpainted.width}x{outpainted.height}: {e}") from None
    return outpainted


def _outpaint_run(engine, plan: GenerationRequest, context: Context, **controls):
    return generate(engine, plan, **controls)


SCRIPTS: dict[str, Script] = {s.name: s for s in [
    Script("x/y/z plot", ("txt2img", "img2img"), _xyz_args, _xyz_prepare, _xyz_run),
    Script("poor man's outpainting", ("img2img",), _outpaint_args, _outpaint_prepare, _outpaint_run),
]}


@dataclass
class Prepared:
    """A script with its checked plan, ready to draw: prepared(engine, **pipeline controls) -> pipeline.Result."""
    script: Script
    plan: Any
    context: Context

    def __call__(self, engine, **controls):
        return self.script.run(engine, self.plan, self.context, **controls)


def prepare(name: str, kind: str, request: GenerationRequest, args: list,
            context: Context | None = None) -> Prepared:
    """The script `name` for txt2img or img2img with its arguments (A1111's script_args) checked against the
    request; nothing is drawn yet."""
    script = find(name, kind)
    context = context or Context()
    return Prepared(script, script.prepare(request, args, kind, context), context)


def names(kind: str) -> list[str]:
    """The scripts of a tab (A1111's /sdapi/v1/scripts lists them by these names)."""
    return [s.name for s in SCRIPTS.values() if kind in s.kinds]


def find(name: str, kind: str) -> Script:
    """The script script_name names (case does not matter, as in A1111), for txt2img or img2img."""
    script = SCRIPTS.get(name.strip().lower()) if isinstance(name, str) else None
    if script is None or kind not in script.kinds:
        there = ", ".join(repr(n) for n in names(kind)) or "none"
        raise ValueError(f"unknown script {name!r} for {kind}; plainsd runs {there}")
    return script


def script_info() -> list[dict]:
    """A1111's /sdapi/v1/script-info: every script of each tab with its arguments."""
    return [{"name": s.name, "is_alwayson": False, "is_img2img": kind == "img2img",
             "args": [asdict(a) for a in s.args(kind)]}
            for kind in ("txt2img", "img2img") for s in SCRIPTS.values() if kind in s.kinds]
