"""A1111's X/Y/Z plot: a picture for every combination of up to three axes' values, in a labelled grid.

    plot = plan(request, XYZSettings(x_type="Seed", x_values="1-3", y_type="CFG Scale", y_values="3, 7"))
    result = run(engine, plot)        # result.images[0]: the grid; the cells follow if include_lone_images

An axis type is a label of A1111's list of axis options (AXIS_OPTIONS), or its index among the ones for txt2img or
img2img (axis_labels), as A1111's script_args give it. Each cell is the request with the cell's axis values applied
(GenerationRequest.replace), drawn by the pipeline as that request on its own would be. Values are written as
in A1111: comma separated (with csv quoting), and for numbers ranges: 1-5, 1-5 (+2), 1-10 [5] (five values
spread evenly). Everything is checked (plan) before the first picture is drawn.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import itertools
import math
import os
import random
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import pipeline, vaes
from .pnginfo import add_fields
from .request import MAX_SEED, GenerationRequest

# A1111's axis_options (scripts/xyz_grid.py) in its order, with the tab each belongs to; x_type, y_type and z_type
# index the labels for the tab (axis_labels). Those plainsd draws are in AXES; the others are refused by name.
AXIS_OPTIONS = [
    ("Nothing", "both"), ("Seed", "both"), ("Var. seed", "both"), ("Var. strength", "both"), ("Steps", "both"),
    ("Hires steps", "txt2img"), ("CFG Scale", "both"), ("Image CFG Scale", "img2img"), ("Prompt S/R", "both"),
    ("Prompt order", "both"), ("Sampler", "txt2img"), ("Hires sampler", "txt2img"), ("Sampler", "img2img"),
    ("Checkpoint name", "both"), ("Negative Guidance minimum sigma", "both"), ("Sigma Churn", "both"),
    ("Sigma min", "both"), ("Sigma max", "both"), ("Sigma noise", "both"), ("Schedule type", "both"),
    ("Schedule min sigma", "both"), ("Schedule max sigma", "both"), ("Schedule rho", "both"),
    ("Beta schedule alpha", "both"), ("Beta schedule beta", "both"), ("Eta", "both"), ("Clip skip", "both"),
    ("Denoising", "both"), ("Initial noise multiplier", "both"), ("Extra noise", "both"), ("Hires upscaler", "txt2img"),
    ("Cond. Image Mask Weight", "img2img"), ("VAE", "both"), ("Styles", "both"), ("UniPC Order", "both"),
    ("Face restore", "both"), ("Token merging ratio", "both"), ("Token merging ratio high-res", "both"),
    ("Always discard next-to-last sigma", "both"), ("SGM noise multiplier", "both"), ("Refiner checkpoint", "both"),
    ("Refiner switch at", "both"), ("RNG source", "both"), ("FP8 mode", "both"), ("Size", "both"),
]


def axis_labels(kind: str) -> list[str]:
    """The axis types of A1111's txt2img or img2img tab, in its order: x_type 3 is axis_labels(kind)[3]."""
    return [label for label, tab in AXIS_OPTIONS if tab in ("both", kind)]


@dataclass
class Cell:
    """One picture of the plot: its request, the model the Checkpoint name axis chose (None: run's engine) and the
    sd_vae setting the VAE axis chose (None: the engine's VAE as it is). no_refiner: the Refiner checkpoint axis
    said None, so the cell draws without one whatever switch it was given (as A1111 draws it)."""
    request: GenerationRequest
    checkpoint: Any = None
    vae: str | None = None
    no_refiner: bool = False


@dataclass
class Checkpoints:
    """The models a Checkpoint name (or Refiner checkpoint) axis chooses among: find(name) -> a key (ValueError
    naming the ones there are for an unknown name); load(key) -> the Engine that draws with it; file(key) -> its
    file or folder (a refiner's, for the request). And the VAEs a VAE axis chooses among: vaes() -> name -> file
    (vaes.find_vaes); use_vae(engine, setting, key) puts in the engine (of the model `key`; None: the one run was
    given) the VAE that sd_vae setting gives that model (vaes.resolve), and the one it gives a refiner
    (runtime.Engine.vae_for)."""
    find: Callable[[str], Any]
    load: Callable[[Any], Any]
    file: Callable[[Any], str] = str
    vaes: Callable[[], dict] = dict
    use_vae: Callable[[Any, str, Any], None] | None = None


PERMUTATIONS = "permutations"  # an axis type: each value is an order of the listed prompt words


@dataclass(frozen=True)
class Axis:
    """How an axis' value changes a cell: apply(cell, value, all the axis' values, checkpoints)."""
    type: Any                            # int, float, str or PERMUTATIONS: how the values are read
    apply: Callable[[Cell, Any, list, Checkpoints | None], None]
    legend: str = "label"                # "label": "Steps: 20"; "value": 20; "path": a file's name; "list": a, b
    choices: bool = False                # A1111 offers a dropdown of values (x_values_dropdown) for it
    cost: float = 0.0                    # slow to change (a model load): its values change in the outermost loop


def _field(name: str):
    def apply(cell: Cell, x, xs, checkpoints):
        cell.request = cell.request.replace(**{name: x})
    return apply


def _hires_field(name: str, label: str):
    def apply(cell: Cell, x, xs, checkpoints):
        hires = cell.request.hires
        if hires is None:
            raise ValueError(f"the {label} axis needs the hires fix (enable_hr, --hires)")
        cell.request = cell.request.replace(hires=dataclasses.replace(hires, **{name: x}))
    return apply


def _prompt_sr(cell: Cell, x: str, xs: list, checkpoints) -> None:
    """A1111's Prompt S/R: the first value is searched for, and each value replaces it in both prompts."""
    r = cell.request
    if xs[0] not in r.prompt and xs[0] not in r.negative_prompt:
        raise ValueError(f"Prompt S/R did not find {xs[0]!r} in the prompt or the negative prompt")
    cell.request = r.replace(prompt=r.prompt.replace(xs[0], x), negative_prompt=r.negative_prompt.replace(xs[0], x))


def _prompt_order(cell: Cell, order: tuple, xs: list, checkpoints) -> None:
    """A1111's Prompt order: the listed words, where they stand in the prompt, put in this value's order."""
    prompt = cell.request.prompt
    missing = [w for w in order if w not in prompt]
    if missing:
        raise ValueError(f"Prompt order did not find {missing[0]!r} in the prompt")
    parts, rest = [], prompt
    for _, word in sorted((prompt.find(w), w) for w in order):
        n = rest.find(word)
        parts.append(rest[:n])
        rest = rest[n + len(word):]
    cell.request = cell.request.replace(prompt="".join(p + w for p, w in zip(parts, order)) + rest)


def _checkpoint(cell: Cell, x: str, xs: list, checkpoints: Checkpoints | None) -> None:
    if checkpoints is None:
        raise ValueError("the Checkpoint name axis has no models to choose among here")
    cell.checkpoint = checkpoints.find(x)


def _refiner(cell: Cell, x: str, xs: list, checkpoints: Checkpoints | None) -> None:
    """A1111's Refiner checkpoint: one of the models by name, or None for no refiner."""
    cell.no_refiner = x.strip() in ("", "None")
    if cell.no_refiner:
        return
    if checkpoints is None:
        raise ValueError("the Refiner checkpoint axis has no models to choose among here")
    cell.request = cell.request.replace(refiner_checkpoint=checkpoints.file(checkpoints.find(x)))


def _vae(cell: Cell, x: str, xs: list, checkpoints: Checkpoints | None) -> None:
    """A1111's VAE axis: Automatic, None or a VAE's name (vaes.find_setting), for the cell's model."""
    if checkpoints is None or checkpoints.use_vae is None:
        raise ValueError("the VAE axis has no VAEs to choose among here")
    cell.vae = vaes.find_setting(x, checkpoints.vaes())


def _denoising(cell: Cell, x: float, xs: list, checkpoints) -> None:
    """img2img's denoising strength, or in txt2img the hires fix's (as A1111's denoising_strength)."""
    r = cell.request
    if r.init_image is not None:
        cell.request = r.replace(strength=x)
    elif r.hires is not None:
        cell.request = r.replace(hires=dataclasses.replace(r.hires, strength=x))
    else:
        raise ValueError("the Denoising axis needs img2img or the hires fix (enable_hr, --hires)")


def _styles(cell: Cell, x: str, xs: list, checkpoints) -> None:
    cell.request = cell.request.replace(styles=[*cell.request.styles, *(s.strip() for s in x.split(","))])


def _size(cell: Cell, x: str, xs: list, checkpoints) -> None:
    width, sep, height = x.partition("x")
    try:
        cell.request = cell.request.replace(width=int(width.strip()), height=int(height.strip()))
    except ValueError:
        raise ValueError(f"the Size axis takes WIDTHxHEIGHT such as 512x768, got {x!r}") from None


def _nothing(cell, x, xs, checkpoints) -> None:
    pass


# The axes plainsd draws, by A1111's label. (Adding one: an entry here, whose apply changes the cell's request.)
AXES: dict[str, Axis] = {
    "Nothing": Axis(str, _nothing, legend="none"),
    "Seed": Axis(int, _field("seed")),
    "Var. seed": Axis(int, _field("subseed")),
    "Var. strength": Axis(float, _field("subseed_strength")),
    "Steps": Axis(int, _field("steps")),
    "Hires steps": Axis(int, _hires_field("steps", "Hires steps")),
    "CFG Scale": Axis(float, _field("cfg_scale")),
    "Prompt S/R": Axis(str, _prompt_sr, legend="value"),
    "Prompt order": Axis(PERMUTATIONS, _prompt_order, legend="list"),
    "Sampler": Axis(str, _field("sampler"), legend="value", choices=True),
    "Hires sampler": Axis(str, _hires_field("sampler", "Hires sampler"), choices=True),
    "Checkpoint name": Axis(str, _checkpoint, legend="path", choices=True, cost=1.0),
    "Sigma Churn": Axis(float, _field("s_churn")),
    "Sigma min": Axis(float, _field("s_tmin")),
    "Sigma max": Axis(float, _field("s_tmax")),
    "Sigma noise": Axis(float, _field("s_noise")),
    "Schedule type": Axis(str, _field("schedule"), choices=True),
    "Eta": Axis(float, _field("eta")),
    "Clip skip": Axis(int, _field("clip_skip")),
    "Denoising": Axis(float, _denoising),
    "Hires upscaler": Axis(str, _hires_field("upscaler", "Hires upscaler"), choices=True),
    "Styles": Axis(str, _styles, choices=True),
    "Token merging ratio": Axis(float, _field("token_merging")),
    "Token merging ratio high-res": Axis(float, _hires_field("token_merging", "Token merging ratio high-res")),
    "Size": Axis(str, _size),
    "Refiner checkpoint": Axis(str, _refiner, legend="path", choices=True, cost=1.0),
    "VAE": Axis(str, _vae, choices=True, cost=0.7),
    "Refiner switch at": Axis(float, _field("refiner_switch_at")),
    "Initial noise multiplier": Axis(float, _field("initial_noise_multiplier")),
    "RNG source": Axis(str, _field("randn_source"), choices=True),
    "Negative Guidance minimum sigma": Axis(float, _field("s_min_uncond")),
}


SEED_AXES = ("Seed", "Var. seed")  # -1 among their values: a random seed, fixed before drawing (as A1111)


@dataclass
class XYZSettings:
    """A1111's X/Y/Z plot arguments, in the order of its script_args."""
    x_type: int | str = "Seed"           # a label of axis_labels(kind), or its index there
    x_values: str = ""                   # the values as text: "1, 2, 3", "1-5 (+2)", ...
    x_values_dropdown: list | None = None    # for axes with choices, unless csv_mode: the values as a list
    y_type: int | str = "Nothing"
    y_values: str = ""
    y_values_dropdown: list | None = None
    z_type: int | str = "Nothing"
    z_values: str = ""
    z_values_dropdown: list | None = None
    draw_legend: bool = True
    include_lone_images: bool = False    # each cell's picture too, after the grid
    include_sub_grids: bool = False      # each Z value's grid too, after the whole grid
    no_fixed_seeds: bool = False         # keep seed -1 (random) in every cell, instead of one seed for all
    vary_seeds_x: bool = False           # a different seed along X (seed + column), Y, Z
    vary_seeds_y: bool = False
    vary_seeds_z: bool = False
    margin_size: int = 0                 # pixels between the cells (0 to 500)
    csv_mode: bool = False               # the values from the text even for axes with choices

    @classmethod
    def from_script_args(cls, args: list) -> "XYZSettings":
        """A1111's script_args list (missing trailing ones: their defaults), each checked for its kind of value."""
        names = [f.name for f in fields(cls)]
        if not isinstance(args, list) or len(args) > len(names):
            raise ValueError(f"the X/Y/Z plot takes up to {len(names)} script_args ({', '.join(names)}), "
                             f"got {len(args) if isinstance(args, list) else type(args).__name__}")
        settings = cls(**dict(zip(names, args)))
        settings.check()
        return settings

    def check(self) -> None:
        for axis in "xyz":
            kind, values, dropdown = (getattr(self, f"{axis}_{n}") for n in ("type", "values", "values_dropdown"))
            if isinstance(kind, bool) or not isinstance(kind, (int, str)):
                raise ValueError(f"{axis}_type must be an axis' index or label, got {kind!r}")
            if values is not None and not isinstance(values, str):
                raise ValueError(f"{axis}_values must be text such as \"1, 2, 3\", got {values!r}")
            if dropdown is not None and not (isinstance(dropdown, list) and all(isinstance(v, str) for v in dropdown)):
                raise ValueError(f"{axis}_values_dropdown must be a list of values as text, got {dropdown!r}")
        for name in ("draw_legend", "include_lone_images", "include_sub_grids", "no_fixed_seeds", "vary_seeds_x",
                     "vary_seeds_y", "vary_seeds_z", "csv_mode"):
            if getattr(self, name) not in (True, False):  # (A1111's UI sends booleans; 0 and 1 pass as well)
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.margin_size, bool) or not isinstance(self.margin_size, int) or not 0 <= self.margin_size <= 500:
            raise ValueError(f"margin_size must be a whole number of pixels from 0 to 500, got {self.margin_size!r}")


# A1111's value ranges: "1-5" and "1-5 (+2)" (a step), "1-10 [5]" (a count); the float forms keep A1111's
# unescaped "." (any character) so that they match what A1111's do
_INT_RANGE = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*")
_FLOAT_RANGE = re.compile(r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\(([+-]\d+(?:.\d*)?)\s*\))?\s*")
_INT_COUNT = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\[(\d+)\s*])?\s*")
_FLOAT_COUNT = re.compile(r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\[(\d+(?:.\d*)?)\s*])?\s*")


def split_values(text: str) -> list[str]:
    """A1111's value text -> values: comma separated, csv quoting ("a, b" is one value), each stripped."""
    return [v.strip() for row in csv.reader(io.StringIO(text), skipinitialspace=True) for v in row]


def parse_values(values: list[str], kind) -> list:
    """Values as text -> the axis' values, ranges expanded as A1111 does (ints: range or linspace truncated;
    floats: arange or linspace)."""
    if kind is PERMUTATIONS:
        return list(itertools.permutations(values))
    if kind not in (int, float):
        return list(values)
    out: list = []
    step_re, count_re = (_INT_RANGE, _INT_COUNT) if kind is int else (_FLOAT_RANGE, _FLOAT_COUNT)
    for value in values:
        if not value.strip():
            continue
        try:
            out += _expand(value, kind, step_re.fullmatch(value), count_re.fullmatch(value))
        except ValueError:
            what = "whole numbers" if kind is int else "numbers"
            raise ValueError(f"takes {what} or ranges such as 1-5, 1-5 (+2), 1-10 [5], got {value!r}") from None
    return out


def _expand(value: str, kind, m, mc) -> list:
    if m is not None:
        start, end, step = (kind(g.replace(" ", "")) if g else None for g in m.groups())
        step = step if step is not None else 1
        if step == 0:
            raise ValueError("a step of 0")
        return list(range(start, end + 1, step)) if kind is int else np.arange(start, end + step, step).tolist()
    if mc is not None:
        start, end = (kind(g.replace(" ", "")) for g in mc.groups()[:2])
        spread = np.linspace(start, end, int(float(mc.group(3))) if mc.group(3) else 1).tolist()
        return [int(v) for v in spread] if kind is int else spread
    return [kind(value)]


@dataclass
class _AxisPlan:
    letter: str          # "X", "Y", "Z"
    label: str
    axis: Axis
    values: list
    text: str            # the values as the user wrote them (the infotext's "X Values")

    def legend(self, value) -> str:
        value = round(value, 8) if isinstance(value, float) else value
        return {"none": "", "value": str(value), "path": os.path.basename(str(value)),
                "list": ", ".join(value) if isinstance(value, tuple) else str(value)}.get(
            self.axis.legend, f"{self.label}: {value}")


@dataclass
class Plot:
    """What plan() checked: the axes with their values and every cell (index x + y * columns + z * columns * rows)."""
    settings: XYZSettings
    axes: list[_AxisPlan]        # X, Y, Z
    cells: list[Cell]
    order: list[int] = field(default_factory=list)   # the cells in drawing order (the costliest axis outermost)


def _axis(settings: XYZSettings, letter: str, kind: str) -> _AxisPlan:
    a = letter.lower()
    chosen = getattr(settings, f"{a}_type")
    labels = axis_labels(kind)
    if isinstance(chosen, int):
        if not 0 <= chosen < len(labels):
            raise ValueError(f"{a}_type {chosen} is not an axis: {kind}'s axis types are 0 to {len(labels) - 1} "
                             f"({', '.join(f'{i} {n}' for i, n in enumerate(labels) if n in AXES)} are drawn)")
        label = labels[chosen]
    else:
        label = next((n for n in labels if n.lower() == chosen.strip().lower()), chosen)
    if label not in AXES or label not in labels:
        drawn = ", ".join(n for n in labels if n in AXES)
        raise ValueError(f"the X/Y/Z plot axis {label!r} is not drawn by plainsd for {kind}; it draws {drawn}")
    axis = AXES[label]
    if label == "Nothing":
        return _AxisPlan(letter, label, axis, [0], "")
    dropdown = getattr(settings, f"{a}_values_dropdown")
    text = getattr(settings, f"{a}_values") or ""
    if axis.choices and not settings.csv_mode and dropdown:
        raw, text = list(dropdown), _csv_line(dropdown)
    else:
        raw = split_values(text)
    try:
        values = parse_values(raw, axis.type)
    except ValueError as e:
        raise ValueError(f"the {letter} axis ({label}) {e}") from None
    if not values:
        raise ValueError(f"the {letter} axis ({label}) has no values; give them as {a}_values, e.g. \"1, 2, 3\"")
    return _AxisPlan(letter, label, axis, values, text)


def _csv_line(values: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out).writerow(values)
    return out.getvalue().strip()


def plan(request: GenerationRequest, settings: XYZSettings, kind: str = "txt2img",
         checkpoints: Checkpoints | None = None, check: Callable[[GenerationRequest], None] | None = None) -> Plot:
    """Every cell's request, checked (GenerationRequest.check, then `check`: e.g. a server's limits), before any
    picture is drawn. kind: "txt2img" or "img2img", whose axis types the settings index."""
    settings.check()
    axes = [_axis(settings, letter, kind) for letter in "XYZ"]
    if not settings.no_fixed_seeds:  # one seed and variation seed for the whole plot, as A1111 fixes them, and -1
        request = request.replace(seed=request.first_seed(), subseed=request.first_subseed())  # on their axes too
        for a in axes:
            if a.label in SEED_AXES:
                a.values = [random.randint(0, MAX_SEED) if v < 0 else v for v in a.values]
    xs, ys, zs = (a.values for a in axes)
    cells = []
    for (iz, z), (iy, y), (ix, x) in itertools.product(enumerate(zs), enumerate(ys), enumerate(xs)):
        cell = Cell(request)
        for a, value in zip(axes, (x, y, z)):
            try:
                a.axis.apply(cell, value, a.values, checkpoints)
            except ValueError as e:
                raise ValueError(f"the {a.letter} axis ({a.label}) value {value!r}: {e}") from None
        if cell.no_refiner:
            cell.request = cell.request.replace(refiner_checkpoint=None, refiner_switch_at=None)
        # A1111's offsets: an axis that does not vary the seeds counts as one column (or row) for the next
        xdim, ydim = (len(xs) if settings.vary_seeds_x else 1), (len(ys) if settings.vary_seeds_y else 1)
        offset = ((ix if settings.vary_seeds_x else 0) + xdim * (iy if settings.vary_seeds_y else 0)
                  + xdim * ydim * (iz if settings.vary_seeds_z else 0))
        if offset and cell.request.seed is not None:
            cell.request = cell.request.replace(seed=cell.request.seed + offset)
        try:
            cell.request.check()
            if check is not None:
                check(cell.request)
        except ValueError as e:
            raise type(e)(f"the X/Y/Z plot cell {_where(axes, x, y, z)}: {e}") from None
        cells.append(cell)
    return Plot(settings, axes, cells, _order(axes))


def _where(axes: list[_AxisPlan], *values) -> str:
    return ", ".join(f"{a.label} {v}" for a, v in zip(axes, values) if a.label != "Nothing") or "(the only one)"


def _order(axes: list[_AxisPlan]) -> list[int]:
    """The cells' drawing order: as A1111 nests its loops, the costliest axis outermost (fewest model loads)."""
    cost = {a.letter: a.axis.cost for a in axes}
    first, second = "Z", "Y"
    for a, b, c in (("X", "Y", "Z"), ("Y", "X", "Z"), ("Z", "X", "Y")):
        if cost[a] > cost[b] and cost[a] > cost[c]:
            first, second = a, (b if cost[b] > cost[c] else c)
    third = ({"X", "Y", "Z"} - {first, second}).pop()
    n = {a.letter: len(a.values) for a in axes}
    order = []
    for combo in itertools.product(*(range(n[letter]) for letter in (first, second, third))):
        i = dict(zip((first, second, third), combo))
        order.append(i["X"] + n["X"] * (i["Y"] + n["Y"] * i["Z"]))
    return order


# --- drawing ---------------------------------------------------------------------------------------------

def run(engine, plot: Plot, checkpoints: Checkpoints | None = None, **controls) -> pipeline.Result:
    """Draw every cell (pipeline.generate with `controls`: callback, interrupt, skip, progress) and the grids.
    The result's images, as A1111 returns them: the grid, each Z value's grid (include_sub_grids), each cell's
    picture (include_lone_images); each with its infotext. Interrupted: the cells not drawn stay black. A VAE
    axis leaves the engine's VAE, and the one it gives a refiner, as it found them."""
    engine = pipeline.as_engine(engine)
    own_vae = (engine.sd.vae, engine.vae_for) if any(cell.vae is not None for cell in plot.cells) else None
    try:
        pictures, results, interrupted = _draw(engine, plot, checkpoints, controls)
    finally:
        if own_vae is not None:  # (as A1111 restores its sd_vae setting)
            engine.use_vae(own_vae[0])
            engine.vae_for = own_vae[1]
    done = [r for r in results if r is not None]
    size = next(p.size for p in pictures if p is not None)
    pictures = [p if p is not None else Image.new("RGB", size) for p in pictures]
    return _assemble(plot, pictures, results, done[0].parameters, interrupted)


def _draw(engine, plot: Plot, checkpoints: Checkpoints | None, controls: dict):
    """The cells' pictures and results in the plot's order (None where not drawn), and whether interrupted."""
    pictures: list[Image.Image | None] = [None] * len(plot.cells)
    results: list[pipeline.Result | None] = [None] * len(plot.cells)
    loaded: tuple[Any, Any] = (None, engine)
    vae_for = None  # (model, sd_vae setting) of the VAE last put in
    for i in plot.order:
        cell = plot.cells[i]
        if cell.checkpoint is not None and loaded[0] != cell.checkpoint:
            loaded, vae_for = (cell.checkpoint, checkpoints.load(cell.checkpoint)), None
        drawer = loaded[1] if cell.checkpoint is not None else engine
        if cell.vae is not None and vae_for != (cell.checkpoint, cell.vae):
            checkpoints.use_vae(drawer, cell.vae, cell.checkpoint)
            vae_for = (cell.checkpoint, cell.vae)
        result = pipeline.generate(drawer, cell.request, **controls)
        results[i] = result
        # several images in a cell: A1111's grid of them (rows: the square root, rounded) stands for the cell
        pictures[i] = result.images[0] if len(result.images) == 1 else image_grid(
            result.images, rows=round(math.sqrt(len(result.images))))
        if result.interrupted:
            return pictures, results, True
    return pictures, results, False


def _assemble(plot: Plot, pictures: list[Image.Image], results: list, parameters, interrupted: bool):
    s, (x, y, z) = plot.settings, plot.axes
    per_grid = len(x.values) * len(y.values)
    grids, infotexts, seeds = [], [], []
    for iz in range(len(z.values)):
        cells = pictures[iz * per_grid:(iz + 1) * per_grid]
        grid = image_grid(cells, rows=len(y.values))
        if s.draw_legend:
            w, h = map(max, zip(*(c.size for c in cells)))
            grid = draw_legend(grid, w, h, [x.legend(v) for v in x.values], [y.legend(v) for v in y.values],
                               s.margin_size)
        grids.append(grid)
        first = results[iz * per_grid]
        infotexts.append(_grid_infotext(plot, first, with_z=False) if first else "")
        seeds.append(first.seeds[0] if first else 0)
    whole = image_grid(grids, rows=1)
    if s.draw_legend:
        w, h = map(max, zip(*(g.size for g in grids)))
        whole = draw_legend(whole, w, h, [z.legend(v) for v in z.values], [""])
    cells_info = [r.infotexts[0] if r else "" for r in results]
    images = [whole] + (grids if s.include_sub_grids else []) + (pictures if s.include_lone_images else [])
    texts = ([_grid_infotext(plot, results[0], with_z=True) if results[0] else ""]
             + (infotexts if s.include_sub_grids else []) + (cells_info if s.include_lone_images else []))
    cell_seeds = [r.seeds[0] if r else 0 for r in results]
    all_seeds = [seeds[0]] + (seeds if s.include_sub_grids else []) + (cell_seeds if s.include_lone_images else [])
    return pipeline.Result(images, all_seeds, texts, parameters, interrupted=interrupted)


def _grid_infotext(plot: Plot, first: pipeline.Result, with_z: bool) -> str:
    """A grid's infotext, as A1111 writes it: its first cell's, with Script, the axes' types and values, and the
    seeds a Seed or Var. seed axis was fixed to."""
    extra = {"Script": "X/Y/Z plot"}
    for a in plot.axes[:3 if with_z else 2]:
        if a.label != "Nothing":
            extra[f"{a.letter} Type"] = a.label
            extra[f"{a.letter} Values"] = a.text
            if a.label in SEED_AXES and not plot.settings.no_fixed_seeds:
                extra[f"Fixed {a.letter} Values"] = ", ".join(str(v) for v in a.values)
    return add_fields(first.infotexts[0], **extra)


def image_grid(images: list[Image.Image], rows: int) -> Image.Image:
    """A1111's image_grid: the pictures row by row on a white sheet, each in a cell of the largest one's size
    (smaller ones centred)."""
    rows = min(rows, len(images))
    cols = math.ceil(len(images) / rows)
    w, h = map(max, zip(*(im.size for im in images)))
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, (i % cols * w + (w - im.width) // 2, i // cols * h + (h - im.height) // 2))
    return grid


MIN_FONT_SIZE = 12  # A1111 sizes the labels' font by the cell ((w + h) / 25); small pictures keep them legible


def draw_legend(grid: Image.Image, width: int, height: int, top: list[str], left: list[str],
                margin: int = 0) -> Image.Image:
    """A1111's draw_grid_annotations: the grid's cells (width x height each) spread `margin` apart, a label over
    each column and, if any left label has text, a band three quarters of a cell wide for them (on small pictures
    wider, up to two cells, so that a label fits on one line). Labels wrap at words and shrink until each line
    fits."""
    size = max((width + height) // 25, MIN_FONT_SIZE)
    spacing = size // 2
    cols, rows = grid.width // width, grid.height // height
    if (cols, rows) != (len(top), len(left)):
        raise ValueError(f"a legend of {len(top)}x{len(left)} labels for a grid of {cols}x{rows} cells")
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad_left = 0
    if any(left):
        longest = max(math.ceil(measure.textlength(text, font=_font(size))) for text in left)
        pad_left = max(width * 3 // 4, min(longest + 2 * spacing, 2 * width))
    top_lines = [_wrap(measure, text, size, width) for text in top]
    left_lines = [_wrap(measure, text, size, pad_left) for text in left]
    top_heights = [sum(_height(measure, t, size) + spacing for t in lines) - spacing for lines in top_lines]
    left_heights = [sum(_height(measure, t, size) for t in lines) for lines in left_lines]
    pad_top = max(top_heights) + 2 * spacing if sum(top_heights) else 0
    out = Image.new("RGB", (grid.width + pad_left + margin * (cols - 1), grid.height + pad_top + margin * (rows - 1)),
                    "white")
    for row, col in itertools.product(range(rows), range(cols)):
        cell = grid.crop((width * col, height * row, width * (col + 1), height * (row + 1)))
        out.paste(cell, (pad_left + (width + margin) * col, pad_top + (height + margin) * row))
    draw = ImageDraw.Draw(out)
    for col, lines in enumerate(top_lines):
        _draw_lines(draw, pad_left + (width + margin) * col + width / 2, pad_top / 2 - top_heights[col] / 2,
                    lines, size, spacing, width)
    for row, lines in enumerate(left_lines):
        _draw_lines(draw, pad_left / 2, pad_top + (height + margin) * row + height / 2 - left_heights[row] / 2,
                    lines, size, spacing, pad_left)
    return out


@functools.lru_cache(maxsize=64)
def _font(size: int):
    """PIL's own font at this size (FreeType's; the fixed bitmap one where PIL has no FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _height(draw: ImageDraw.ImageDraw, text: str, size: int) -> int:
    box = draw.textbbox((0, 0), text, font=_font(size)) if text else (0, 0, 0, 0)
    return box[3] - box[1]


def _wrap(draw: ImageDraw.ImageDraw, text: str, size: int, width: int) -> list[str]:
    lines = [""]
    for word in text.split():
        line = f"{lines[-1]} {word}".strip()
        if draw.textlength(line, font=_font(size)) <= width:
            lines[-1] = line
        else:
            lines.append(word)
    return lines


def _draw_lines(draw, x: float, y: float, lines: list[str], size: int, spacing: int, width: int) -> None:
    """Lines centred on x from y down, each in the largest font up to `size` that fits in `width`."""
    for line in lines:
        fit = size
        while fit > 1 and draw.textlength(line, font=_font(fit)) > width:
            fit -= 1
        height = _height(draw, line, size)
        draw.text((x, y + height / 2), line, font=_font(fit), fill="black", anchor="mm")
        y += height + spacing
