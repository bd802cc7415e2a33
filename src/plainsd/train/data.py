"""Training data: a captioned world of coloured shapes drawn with Pillow, and users' own image folders.

The shapes world is deterministic by seed: sample i of seed s is always the same picture and caption.
Captions vary in phrasing and sometimes leave an attribute out, so that an unspecified attribute is
sampled rather than fixed. The heart and the star are known to the generator and the judge but left out of
the base model's data (HELD_OUT), for the fine-tuning recipes to teach: the heart, because large ones survive
the shipped VAE's round trip, where the star's thin points come back as a blob.

For CLIP, hard negatives: groups of scenes that differ in one attribute, and which caption fits which image.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image, ImageDraw

from ..images import to_tensor

if TYPE_CHECKING:
    from .loop import TrainConfig

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 220, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
BACKGROUNDS = {**COLOURS, "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
HELD_OUT = ("star", "heart")
ALL_SHAPES = SHAPES + HELD_OUT
SIZES = {"small": 0.25, "large": 0.45}  # side of the shape's box as a fraction of the image side
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "centre": (0.5, 0.5)}
PAIRS = (("left", "right"), ("top", "bottom"))

_POS_WORDS = {
    "left": ["on the left", "at the left", "on the left side"], "right": ["on the right", "at the right", "on the right side"],
    "top": ["at the top", "on top", "in the upper part"], "bottom": ["at the bottom", "in the lower part", "at the bottom"],
    "centre": ["in the centre", "in the middle", "in the center"],
}


@dataclass
class Obj:
    shape: str
    colour: str
    size: str
    position: str


@dataclass
class Scene:
    objects: list[Obj]
    background: str
    caption: str = ""
    # which attributes the caption states, per object: e.g. {"shape", "colour", "position"}
    stated: list[set] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["stated"] = [sorted(s) for s in self.stated]
        return d


def shape_polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]] | None:
    """Vertices of a shape filling a side x side box centred on (cx, cy); None for the circle."""
    h = side / 2
    if shape == "circle":
        return None
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    if shape == "cross":
        a = side / 6
        return [(cx - a, cy - h), (cx + a, cy - h), (cx + a, cy - a), (cx + h, cy - a), (cx + h, cy + a), (cx + a, cy + a),
                (cx + a, cy + h), (cx - a, cy + h), (cx - a, cy + a), (cx - h, cy + a), (cx - h, cy - a), (cx - a, cy - a)]
    if shape == "heart":  # the classic parametric heart, scaled into the box
        pts = []
        for k in range(64):
            t = 2 * math.pi * k / 64
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + x / 16 * h, cy - (y + 2.5) / 14.5 * h))
        return pts
    if shape == "star":
        pts = []
        for k in range(10):
            r = h if k % 2 == 0 else h * 0.42
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * math.cos(ang), cy + h * 0.08 + r * math.sin(ang)))
        return pts
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(ALL_SHAPES)}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, side: float, fill) -> None:
    poly = shape_polygon(shape, cx, cy, side)
    if poly is None:
        draw.ellipse([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def render(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """Draw a scene, anti-aliased by drawing larger and shrinking."""
    big = size * supersample
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        px, py = POSITIONS[o.position]
        draw_shape(draw, o.shape, px * big, py * big, SIZES[o.size] * big, COLOURS[o.colour])
    return image.resize((size, size), Image.LANCZOS)


def _phrase(o: Obj, stated: set, rng: random.Random) -> str:
    words = []
    if "size" in stated:
        words.append(o.size if rng.random() < 0.8 else {"small": "little", "large": "big"}[o.size])
    if "colour" in stated:
        words.append(o.colour)
    words.append(o.shape)
    text = " ".join(words)
    if "position" in stated:
        text += " " + rng.choice(_POS_WORDS[o.position])
    return text


def caption(scene: Scene, rng: random.Random) -> str:
    """One of several phrasings of the scene, stating only the attributes in scene.stated."""
    bg = scene.background
    say_bg = rng.random() < 0.5
    if len(scene.objects) == 2:
        a, b = (_phrase(o, s, rng) for o, s in zip(scene.objects, scene.stated))
        text = f"a {a} and a {b}"
        return text + (f", {bg} background" if say_bg else "")
    o, stated = scene.objects[0], scene.stated[0]
    form = rng.randrange(4)
    if form == 0:
        text = "a " + _phrase(o, stated, rng)
        return text + (f" on a {bg} background" if say_bg else "")
    if form == 1:  # "red circle, left side, on blue"
        parts = [" ".join(w for w in ((o.size if "size" in stated else ""), (o.colour if "colour" in stated else ""), o.shape) if w)]
        if "position" in stated:
            parts.append(f"{o.position} side" if o.position != "centre" else "centre")
        if say_bg:
            parts.append(f"on {bg}")
        return ", ".join(parts)
    if form == 2:
        text = f"a {o.shape}"
        if "colour" in stated:
            text += f" that is {o.colour}"
        if "size" in stated:
            text += f", {o.size}"
        if "position" in stated:
            text += ", " + rng.choice(_POS_WORDS[o.position])
        return text + (f", {bg} background" if say_bg else "")
    text = _phrase(o, stated, rng)
    return text + (f" on {bg}" if say_bg else "")


def random_scene(rng: random.Random, shapes=SHAPES, two_objects: float = 0.25, sizes=tuple(SIZES),
                 colours=tuple(COLOURS), positions=tuple(POSITIONS), backgrounds=tuple(BACKGROUNDS)) -> Scene:
    """A random scene whose objects and background take only the given values (all of them by default)."""
    n = 2 if rng.random() < two_objects else 1
    picked = rng.sample(list(colours), n)
    background = rng.choice([b for b in backgrounds if b not in picked])
    if n == 1:
        where = [rng.choice(list(positions))]
    else:
        where = list(rng.choice([p for p in PAIRS if set(p) <= set(positions)]))
        rng.shuffle(where)
    objects = [Obj(rng.choice(shapes), c, rng.choice(sizes), p) for c, p in zip(picked, where)]
    stated = []
    for _ in objects:
        s = {"shape", "colour"}
        if rng.random() < 0.15:  # sometimes the colour is left to the model
            s.discard("colour")
        if rng.random() < 0.6:
            s.add("size")
        if rng.random() < 0.8 or n == 2:
            s.add("position")
        stated.append(s)
    scene = Scene(objects, background, stated=stated)
    scene.caption = caption(scene, rng)
    return scene


class ShapesDataset:
    """dataset[i] -> (PIL image, caption, scene); deterministic in (seed, i)."""

    def __init__(self, length: int = 100_000, seed: int = 0, size: int = 64, shapes=SHAPES, two_objects: float = 0.25,
                 sizes=tuple(SIZES), colours=tuple(COLOURS), positions=tuple(POSITIONS), backgrounds=tuple(BACKGROUNDS)):
        unknown = [x for x in (*shapes, *sizes) if x not in ALL_SHAPES and x not in SIZES]
        if unknown:
            raise ValueError(f"unknown shape or size {unknown[0]!r}; shapes: {', '.join(ALL_SHAPES)}; sizes: {', '.join(SIZES)}")
        for what, values, known in (("colour", colours, COLOURS), ("position", positions, POSITIONS),
                                    ("background", backgrounds, BACKGROUNDS)):
            wrong = [v for v in values if v not in known] or ([] if values else ["(none)"])
            if wrong:
                raise ValueError(f"unknown {what} {wrong[0]!r}; known: {', '.join(known)}")
        together = [{c} for c in colours] + [{a, b} for a in colours for b in colours if a != b and two_objects > 0]
        if any(set(backgrounds) <= c for c in together):
            raise ValueError("the objects' colours need a background of another colour to stand out on")
        if two_objects > 0 and (len(colours) < 2 or not any(set(p) <= set(positions) for p in PAIRS)):
            raise ValueError("two-object scenes need two colours and both positions of a pair (left and right, or top "
                             "and bottom); set two_objects to 0 for one object")
        self.length, self.seed, self.size, self.shapes, self.two_objects = length, seed, size, tuple(shapes), two_objects
        self.sizes, self.colours, self.positions = tuple(sizes), tuple(colours), tuple(positions)
        self.backgrounds = tuple(backgrounds)

    def __len__(self) -> int:
        return self.length

    def scene(self, i: int) -> Scene:
        return random_scene(random.Random(self.seed * 1_000_003 + i), self.shapes, self.two_objects, self.sizes,
                            self.colours, self.positions, self.backgrounds)

    def __getitem__(self, i: int):
        if not 0 <= i < self.length:
            raise IndexError(i)
        scene = self.scene(i)
        return render(scene, self.size), scene.caption, scene


def read_metadata(path: Path) -> list[dict]:
    """The rows of a Hugging Face imagefolder metadata.jsonl (none if there is no file), each a JSON object with a
    file_name; a ValueError naming the line of any other."""
    rows = []
    if path.is_file():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                raise ValueError(f"{path}, line {n}: expected a JSON object with a file_name")
            rows.append(row)
    return rows



@dataclass(frozen=True)
class Crop:
    """Where a square training picture came from, as SDXL's size conditioning states it: the source picture's size,
    and the top-left corner of the part kept, in the pixels of the source scaled to cover the training size."""
    width: int
    height: int
    top: int = 0
    left: int = 0


def centre_crop(width: int, height: int, size: int) -> Crop:
    """The Crop of ImageOps.fit(source, (size, size)): the source scaled until its shorter side is size, its centre
    kept (the corner rounded as diffusers' SDXL trainer rounds it)."""
    scale = size / min(width, height)
    return Crop(width, height, top=round((height * scale - size) / 2), left=round((width * scale - size) / 2))


class FolderDataset:
    """Users' own data, in the ecosystem's two conventions:

    - image files with a caption in a same-name .txt file (kohya, A1111), or
    - metadata.jsonl with {"file_name": ..., "text": ...} per line (Hugging Face imagefolder).
    """

    EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

    def __init__(self, folder: str | Path, size: int = 64, caption_column: str = "text"):
        self.folder, self.size = Path(folder), size
        if not self.folder.is_dir():
            raise ValueError(f"no such data folder: {self.folder}")
        meta = self.folder / "metadata.jsonl"
        self.items: list[tuple[Path, str]] = []
        if meta.is_file():
            self.items = [(self.folder / row["file_name"], str(row.get(caption_column, ""))) for row in read_metadata(meta)]
        else:
            for path in sorted(self.folder.iterdir()):
                if path.suffix.lower() in self.EXTENSIONS:
                    txt = path.with_suffix(".txt")
                    self.items.append((path, txt.read_text().strip() if txt.is_file() else ""))
        if not self.items:
            raise ValueError(f"{self.folder} holds no images ({', '.join(self.EXTENSIONS)}) and no metadata.jsonl")
        missing = [str(p) for p, _ in self.items if not p.is_file()]
        if missing:
            raise ValueError(f"metadata.jsonl names files that are not there: {', '.join(missing[:3])}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import ImageOps

        path, text = self.items[i]
        try:
            image = Image.open(path).convert("RGB")
        except OSError as e:
            raise ValueError(f"cannot read image {path}: {e}") from None
        return ImageOps.fit(image, (self.size, self.size), Image.LANCZOS), text, None

    def crop(self, i: int) -> Crop:
        """Where item i's picture came from (its file's size; only the header is read)."""
        with Image.open(self.items[i][0]) as image:
            return centre_crop(*image.size, self.size)


# --- hard negatives for CLIP ------------------------------------------------------------------------

def fits(caption_scene: Scene, image_scene: Scene) -> bool:
    """Whether an image shows everything a single-object caption states (the background only if named)."""
    if len(caption_scene.objects) != 1 or len(image_scene.objects) != 1:
        return caption_scene == image_scene
    a, b = caption_scene.objects[0], image_scene.objects[0]
    if any(getattr(a, k) != getattr(b, k) for k in caption_scene.stated[0] | {"shape"}):
        return False
    said_bg = re.search(rf"\b{caption_scene.background}\b", caption_scene.caption) is not None
    return not said_bg or caption_scene.background == image_scene.background


VARY = ("shape", "size", "position")  # what hard negatives may change (a list may repeat one to weight it)


def hard_negative_scenes(ds: ShapesDataset, rng: random.Random, groups: int, group: int, vary=VARY) -> list[Scene]:
    """`groups` groups of `group` single-object scenes: a random one, then variants of it that each differ in one
    attribute (drawn from `vary`), captioned anew with the same stated attributes."""
    scenes = []
    for _ in range(groups):
        base = random_scene(rng, ds.shapes, two_objects=0.0, sizes=ds.sizes)
        o = base.objects[0]
        scenes.append(base)
        for _ in range(group - 1):
            what = rng.choice(vary)
            choices = {"shape": ds.shapes, "size": ds.sizes, "position": tuple(POSITIONS)}[what]
            value = rng.choice([c for c in choices if c != getattr(o, what)])
            v = Scene([dataclasses.replace(o, **{what: value})], base.background, stated=[set(base.stated[0])])
            v.caption = caption(v, rng)
            scenes.append(v)
    return scenes


def hard_negative_batch(ds: ShapesDataset, cfg: TrainConfig, step: int, micro: int, fraction: float, group: int,
                        vary=VARY):
    """A CLIP batch in which `fraction` of the pairs are hard_negative_scenes, so that the towers must tell apart
    shapes and sizes, not only the colours that random batches already separate; the rest are random scenes.
    Returns images, captions and the 0/1 matrix of which caption fits which image (a caption that leaves the
    size out fits both sizes). A pure function of (seed, step, micro)."""
    rng = random.Random(f"{cfg.seed}:{step}:{micro}:hard")
    scenes = hard_negative_scenes(ds, rng, int(cfg.batch_size * fraction) // group, group, vary)
    scenes += [ds.scene(rng.randrange(len(ds))) for _ in range(cfg.batch_size - len(scenes))]
    images = torch.cat([to_tensor(render(s, ds.size)) for s in scenes])
    return images, [s.caption for s in scenes], clip_targets(scenes)


def clip_targets(scenes: list[Scene]) -> torch.Tensor:
    """[i, j] = 1 where scene i's caption fits scene j's image (always on the diagonal), else 0."""
    return torch.tensor([[float(i == j or fits(a, b)) for j, b in enumerate(scenes)] for i, a in enumerate(scenes)])
