"""How well captions name what a shapes-world picture shows: each caption read back into objects and compared
with the scene's (or with what the judge reads off a generated picture).

read_caption understands the shapes world's own phrasings (train/data.py) and the captioner's one phrasing:
a sentence per object joined by "and", each naming a size, a colour, a shape and a position in the grammar's
words, and optionally a background. A caption is right on an attribute when every object of the scene is named
with it; objects are paired in reading order (left or top first), so a caption must also name as many objects
as the scene has.
"""

from __future__ import annotations

import re

from ..train.data import ALL_SHAPES, BACKGROUNDS, COLOURS, POSITIONS, SIZES, Obj, Scene
from .judge import ATTRIBUTES, detect

_SIZE_WORDS = {**{s: s for s in SIZES}, "little": "small", "big": "large"}
_POSITION_WORDS = {**{p: p for p in POSITIONS}, "center": "centre", "middle": "centre", "upper": "top",
                   "lower": "bottom"}
_ORDER = {"left": 0, "top": 0, "centre": 0, "right": 1, "bottom": 1, None: 0}
_BACKGROUND = re.compile(rf"(?:,\s*|\s+on\s+(?:a\s+)?)({'|'.join(BACKGROUNDS)})(?:\s+background)?\s*$")


def _first(words: list[str], table: dict[str, str]) -> str | None:
    return next((table[w] for w in words if w in table), None)


def read_caption(text: str) -> tuple[list[Obj], str | None]:
    """A caption -> (its objects, attributes it leaves out None; the background it names, or None)."""
    text = text.strip().lower()
    background = None
    m = _BACKGROUND.search(text)
    if m:
        background, text = m.group(1), text[:m.start()]
    objects = []
    for part in re.split(r"\band\b", text):
        words = re.findall(r"[a-z]+", part)
        shape = next((w for w in words if w in ALL_SHAPES), None)
        if shape is None:
            continue
        colour = next((w for w in words if w in COLOURS), None)
        objects.append(Obj(shape, colour, _first(words, _SIZE_WORDS), _first(words, _POSITION_WORDS)))
    return objects, background


def caption_verdict(text: str, scene: Scene) -> dict[str, bool]:
    """Which attributes a caption names right for every object of the scene (and the object count)."""
    named, _ = read_caption(text)
    count = len(named) == len(scene.objects)
    truth = sorted(scene.objects, key=lambda o: _ORDER[o.position])
    named = sorted(named, key=lambda o: _ORDER[o.position])
    verdict = {a: count and all(getattr(n, a) == getattr(t, a) for n, t in zip(named, truth)) for a in ATTRIBUTES}
    verdict["count"] = count
    verdict["all"] = all(verdict.values())
    return verdict


def caption_shares(captions: list[str], scenes: list[Scene]) -> dict[str, float]:
    """The share of captions right on each attribute, and on all of them at once ("all")."""
    verdicts = [caption_verdict(c, s) for c, s in zip(captions, scenes, strict=True)]
    return {k: sum(v[k] for v in verdicts) / len(verdicts) for k in verdicts[0]}


def judged_scene(image) -> Scene:
    """What the judge reads off a picture, as a scene (for pictures whose true scene nobody knows: generated
    ones)."""
    background, found = detect(image)
    return Scene([Obj(d.shape, d.colour, d.size, d.position) for d in found], background)
