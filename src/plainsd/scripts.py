"""A1111's scripts, as its API reaches them (script_name, script_args): the ones plainsd runs, for txt2img and img2img.

    run = prepare("x/y/z plot", "txt2img", request, script_args)   # the name and arguments checked (ValueError)
    result = run(engine)          # a pipeline.Result: the script's images and infotexts

A script is one entry of SCRIPTS: its name as A1111 matches script_name (its title in lower case), the tabs it
serves, its arguments in A1111's script_args order (what /sdapi/v1/script-info lists), prepare and run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from . import upscale, xyz
from .images import INPAINTING_FILLS, inpainting_fill
from .pipeline import Result, as_engine, generate, outpaint_request
from .pnginfo import add_fields
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
    """What a script may need besides the request: the models a Checkpoint name axis chooses among (and the VAEs
    a VAE axis does), and a check of every request it will run (e.g. a server's limits; ValueError)."""
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


def _whole(value, what: str, least: int, script: str = "poor man's outpainting") -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a slider's 128.0
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{script}'s {what} must be a whole number, {least} or more, got {value!r}")
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


# --- SD upscale ----------------------------------------------------------------------------------------------

@dataclass
class SDUpscale:
    """A1111's "SD upscale": the init image upscaled (by an upscaler, `scale` times), cut into tiles of the request's
    width x height overlapping by `overlap` pixels, each tile drawn as img2img of itself, the tiles blended back."""
    request: GenerationRequest    # what each tile is drawn with (its init image: the picture to upscale)
    upscaler: str                 # as listed (upscale.upscaler_names); "None": the picture as it is, unscaled
    scale: float
    overlap: int


def _sd_upscale_args(kind: str) -> list[ScriptArg]:
    names = upscale.upscaler_names()
    return [ScriptArg("Info"), ScriptArg("Tile overlap", 64, 0, 256, 16),
            ScriptArg("Upscaler", names[0], choices=names), ScriptArg("Scale Factor", 2.0, 1.0, 4.0, 0.05)]


def _sd_upscale_prepare(request: GenerationRequest, args: list, kind: str, context: Context) -> SDUpscale:
    """A1111's script_args [unused, overlap, upscaler (a name, any case, or its index in the list), scale]."""
    if not isinstance(args, list) or len(args) > 4:
        raise ValueError(f"SD upscale takes up to 4 script_args (unused, Tile overlap, Upscaler, Scale Factor), "
                         f"got {args!r}")
    _, overlap, name, scale = [*args, *(a.value for a in _sd_upscale_args(kind)[len(args):])]
    overlap = _whole(overlap, "Tile overlap (script_args[1])", 0, "SD upscale")
    names = upscale.upscaler_names(request.upscalers_dir)
    if isinstance(name, int) and not isinstance(name, bool) and 0 <= name < len(names):
        name = names[name]  # (A1111's radio button sends the index)
    if not isinstance(name, str):
        raise ValueError(f"SD upscale's Upscaler (script_args[2]) must be a name or an index in {', '.join(names)}, "
                         f"got {name!r}")
    found = upscale.find_upscaler(name, request.upscalers_dir)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 1.0 <= scale <= 8.0:
        raise ValueError(f"SD upscale's Scale Factor (script_args[3]) must be a number from 1 to 8, got {scale!r}")
    if request.init_image is None:
        raise ValueError("SD upscale needs an init image (init_images) to upscale")
    if request.mask is not None:
        raise ValueError("SD upscale redraws the whole picture; leave out mask")
    plan = SDUpscale(request, found.name if found else name, float(scale), overlap)
    width, height = _sd_upscale_size(plan)
    if context.check is not None:  # the server's limits, on the final size (the tiles are no larger)
        context.check(request.replace(width=width, height=height))
    if request.width and request.height:
        _sd_upscale_tiles(plan, request.width, request.height, width, height)
    return plan


def _sd_upscale_size(plan: SDUpscale) -> tuple[int, int]:
    """The upscaled picture's size (upscale.upscale's: multiples of 8; "None": the init image's)."""
    image = plan.request.init_image
    if plan.upscaler == "None":
        return image.width, image.height
    return int(image.width * plan.scale) // 8 * 8, int(image.height * plan.scale) // 8 * 8


def _sd_upscale_tiles(plan: SDUpscale, width: int, height: int, image_w: int, image_h: int) -> tuple[int, int]:
    """The tile size: the request's width x height, smaller where the picture is (A1111 would pad with black)."""
    tile_w, tile_h = min(width, image_w), min(height, image_h)
    if plan.overlap >= min(tile_w, tile_h):
        raise ValueError(f"SD upscale's Tile overlap ({plan.overlap} px) must be less than the tiles' "
                         f"{tile_w}x{tile_h} (the request's width and height)")
    if tile_w % 8 or tile_h % 8:
        raise ValueError(f"SD upscale draws tiles of {tile_w}x{tile_h}; the picture ({image_w}x{image_h}) must be "
                         f"at least the tile size or a multiple of 8 on a side")
    return tile_w, tile_h


def _sd_upscale_run(engine, plan: SDUpscale, context: Context, record_steps: bool = False, **controls) -> Result:
    """Each of batch_count pictures: tile k of the upscaled picture drawn with seed + n + k // batch_size +
    k % batch_size (A1111's seeds: each batch of tiles starts one after the last batch's first), blended as
    A1111's combine_grid blends; its infotext is its first tile's with "SD upscale overlap" and "SD upscale
    upscaler". An interrupted run keeps the remaining tiles as upscaled."""
    if record_steps:
        raise ValueError("SD upscale draws many tiles; it records no steps")
    engine, req = as_engine(engine), plan.request
    picture = req.init_image.convert("RGB")
    if plan.upscaler != "None":
        precision = "bf16" if engine.sd.unet.dtype == torch.bfloat16 else "fp32"
        picture = upscale.upscale(picture, plan.upscaler, plan.scale, req.upscalers_dir, tile=req.upscaler_tile,
                                  tile_overlap=req.upscaler_tile_overlap, precision=precision,
                                  progress=controls.get("progress", False))
    size = engine.sd.config.resolution
    tile_w, tile_h = _sd_upscale_tiles(plan, req.width or size, req.height or size, *picture.size)
    seed, subseed, per_batch = req.first_seed(), req.first_subseed(), req.batch_size
    out = Result([], [], [], None)
    for n in range(req.batch_count):
        drawn: list[Result] = []

        def draw(tile: torch.Tensor) -> torch.Tensor:
            k = len(drawn)
            if out.interrupted:
                return tile
            one = req.replace(init_image=upscale._to_pil(tile), width=tile_w, height=tile_h, batch_size=1,
                              batch_count=1, seed=seed + n + k // per_batch + k % per_batch,
                              subseed=subseed + k % per_batch)
            drawn.append(generate(engine, one, **controls))
            out.interrupted = drawn[-1].interrupted
            return upscale._to_tensor(drawn[-1].images[0])

        combined = upscale.tiled(draw, upscale._to_tensor(picture), tile_w, tile_h, plan.overlap)
        out.images.append(upscale._to_pil(combined))
        out.seeds.append(drawn[0].seeds[0])
        out.subseeds.append(drawn[0].subseeds[0])
        out.infotexts.append(add_fields(drawn[0].infotexts[0], **{"SD upscale overlap": plan.overlap,
                                                                  "SD upscale upscaler": plan.upscaler}))
        out.parameters = out.parameters or drawn[0].parameters
        if out.interrupted:
            break
    return out


SCRIPTS: dict[str, Script] = {s.name: s for s in [
    Script("x/y/z plot", ("txt2img", "img2img"), _xyz_args, _xyz_prepare, _xyz_run),
    Script("poor man's outpainting", ("img2img",), _outpaint_args, _outpaint_prepare, _outpaint_run),
    Script("sd upscale", ("img2img",), _sd_upscale_args, _sd_upscale_prepare, _sd_upscale_run),
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
