"""A deterministic judge for the shapes world: reads colour, shape, size and position of each object.

Background = the median colour of the border; objects = connected regions that differ from it. Colour
is the nearest palette colour; size and position come from the region's box; shape is the template
(rendered by the data generator itself) whose box-normalised mask overlaps the region's best.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from ..train.data import ALL_SHAPES, BACKGROUNDS, COLOURS, POSITIONS, SIZES, Scene, draw_shape

GRID = 32          # masks are compared at this resolution, after cropping to their boxes
FG_DISTANCE = 60   # RGB distance from the background that makes a pixel part of an object
MIN_AREA = 0.004   # smallest object, as a fraction of the image


@dataclass
class Detection:
    shape: str
    colour: str
    size: str
    position: str
    area: float        # fraction of the image
    score: float       # IoU with the best shape template


@lru_cache(maxsize=None)
def _templates() -> dict[str, np.ndarray]:
    out = {}
    for shape in ALL_SHAPES:
        img = Image.new("L", (512, 512), 0)
        draw_shape(ImageDraw.Draw(img), shape, 256, 256, 400, 255)
        out[shape] = _normalise(np.asarray(img) > 127)
    return out


def _normalise(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    small = Image.fromarray((crop * 255).astype(np.uint8)).resize((GRID, GRID), Image.BILINEAR)
    return np.asarray(small) > 127


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected regions of a boolean mask, largest first."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    regions = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        n = len(regions) + 1
        labels[y0, x0] = n
        stack, pixels = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = n
                    stack.append((yy, xx))
        regions.append(labels == n)
    return sorted(regions, key=lambda r: -int(r.sum()))


def _nearest(colour: np.ndarray, palette: dict) -> str:
    return min(palette, key=lambda k: float(np.sum((np.asarray(palette[k], dtype=np.float32) - colour) ** 2)))


def detect(image: Image.Image, max_objects: int = 2) -> tuple[str, list[Detection]]:
    """-> (background colour name, objects found, largest first)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w, _ = arr.shape
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.sqrt(((arr - bg) ** 2).sum(-1))
    found = []
    for region in _components(dist > FG_DISTANCE)[:max_objects]:
        area = float(region.sum()) / (h * w)
        if area < MIN_AREA:
            break
        core = region & (dist > np.percentile(dist[region], 50))  # the object's own colour, away from its edge
        colour = _nearest(np.median(arr[core if core.any() else region], axis=0), COLOURS)
        ys, xs = np.nonzero(region)
        side = max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) / max(h, w)
        cx, cy = (xs.min() + xs.max() + 1) / 2 / w, (ys.min() + ys.max() + 1) / 2 / h
        size = min(SIZES, key=lambda k: abs(SIZES[k] - side))
        position = min(POSITIONS, key=lambda k: (POSITIONS[k][0] - cx) ** 2 + (POSITIONS[k][1] - cy) ** 2)
        norm = _normalise(region)
        ious = {s: float((norm & t).sum() / max((norm | t).sum(), 1)) for s, t in _templates().items()}
        shape = max(ious, key=ious.get)
        found.append(Detection(shape, colour, size, position, area, ious[shape]))
    return _nearest(bg, BACKGROUNDS), found


ATTRIBUTES = ("shape", "colour", "size", "position")


def judge(image: Image.Image, scene: Scene) -> list[dict[str, bool]]:
    """For each object the caption asked for: which of its stated attributes the image got right.

    Objects are matched to detections by stated position when there is one, else in order of size.
    A missing object gets False for everything it asked.
    """
    _, found = detect(image, max_objects=max(2, len(scene.objects)))
    results, used = [], set()
    for obj, stated in zip(scene.objects, scene.stated or [set(ATTRIBUTES)] * len(scene.objects)):
        candidates = [i for i in range(len(found)) if i not in used]
        if "position" in stated:
            candidates.sort(key=lambda i: found[i].position != obj.position)
        best = candidates[0] if candidates else None
        if best is None:
            results.append({a: False for a in stated})
            continue
        used.add(best)
        d = found[best]
        results.append({a: getattr(d, a) == getattr(obj, a) for a in ATTRIBUTES if a in stated})
    if len(scene.objects) == 1 and len(found) > 1 and found[1].area > 0.3 * found[0].area:
        results[0]["count"] = False  # a clear second object where one was asked for
    return results
