"""The shipped canny ControlNet on the shipped model: does the picture follow the edges?

Held-out scenes (metrics.held_out_scenes: seeds no training recipe uses), one object each. For scene A the control
picture is its 64x64 render, the unit's module canny; the prompt names only the colour ("a red", the opening of
the captions' commonest phrasing: the captions always name a shape, so nothing shorter was seen in training).
The judge reads the drawn object.

1. Adherence: the share of pictures with scene A's shape and position, with the unit and without it (the base
   model then draws a shape and position of its own choosing, matching by chance).
2. Contradiction: the prompt "a <colour> <shape B>" (B != A's shape) with A's edges, at control weights 0 to 1:
   the share drawing A's shape and B's (it should slide from B to A).
3. Guidance end 0.5: the unit on for the first half of the steps only; shape and position as in 1, and the
   position alone (the composition: the outline of a small object is settled in the later steps).
4. CFG scale (--cfg-sweep): adherence as in 1 (pixel perfect) at each scale, on other held-out scenes than 1-3's
   (seed CFG_CHOICE_SEED), so that a scale chosen from this table is not chosen on the scenes it is reported on.

Each for three units: pixel perfect (the processor resolution that fits 64x64, here 64), the extension's
default processor resolution 512 (canny on the picture grown to 512, the edge map shrunk back by fit), and pixel
perfect with control mode "ControlNet is more important" (the extension's soft weights, and residuals on the
prompt's half of the guidance batch only, so that guidance pushes toward the edges). The rest
is the shipped model's recommended settings (20 steps of DPM++ 2M karras, CFG 5 until 60%; --cfg-scale sets
another scale) and the default runtime; the seed of scene i's picture is i.

    .venv/bin/python benchmarks/controlnet_adherence.py                # 100 scenes, 50 per weight; writes the .md
    .venv/bin/python benchmarks/controlnet_adherence.py --scenes 20 --contradictions 10 --out /tmp/x.md
    .venv/bin/python benchmarks/controlnet_adherence.py --scenes 0 --contradictions 0 --cfg-sweep 1,1.5,2,3,5
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import plainsd
from plainsd import runtime
from plainsd.eval.judge import detect, judge
from plainsd.eval.metrics import HELD_OUT_SEED, held_out_scenes
from plainsd.runtime import cpu_name
from plainsd.pipeline import txt2img
from plainsd.request import ControlUnit
from plainsd.train.data import SHAPES, Scene, render

SHIPPED = "plainsd-base.controlnet-canny"
MODEL = SHIPPED  # the ControlNet measured (--controlnet)
CFG: float | None = None  # the CFG scale (--cfg-scale); None: the model's own
CFG_CHOICE_SEED = HELD_OUT_SEED + 7  # the scenes of the CFG sweep, apart from the reported ones
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
UNITS = {"pixel perfect": dict(pixel_perfect=True), "processor res 512 (default)": dict(processor_res=512),
         "pixel perfect, ControlNet is more important": dict(pixel_perfect=True,
                                                             control_mode="ControlNet is more important")}


def unit(scene: Scene, weight: float = 1.0, **settings) -> ControlUnit:
    return ControlUnit(MODEL, render(scene, 64), module="canny", weight=weight, **settings)


def draw(engine, prompt: str, seed: int, units: tuple, cfg_scale: float | None = None):
    """The picture at the model's recommended settings but for the CFG scale (cfg_scale, else --cfg-scale)."""
    scale = cfg_scale or CFG
    return txt2img(engine, prompt, seed=seed, controlnet=units, sampler="DPM++ 2M",
                   **({"cfg_scale": scale} if scale else {})).images[0]


def cfg_words() -> str:
    return f"CFG {CFG:g}" if CFG else "the model's CFG"


def follows(engine, scene: Scene, prompt: str, seed: int, units: tuple, cfg_scale: float | None = None) -> dict:
    """The judge's verdicts on the picture: {"shape": bool, "position": bool} against the scene's object."""
    picture = draw(engine, prompt, seed, units, cfg_scale)
    return judge(picture, Scene(scene.objects, scene.background, prompt, [{"shape", "position"}]))[0]


def adherence(engine, scenes: list[Scene], settings: dict | None, prompt: str,
              cfg_scale: float | None = None) -> tuple[float, float]:
    """Shares of pictures with scene A's shape and position, and with its position; settings None: no unit."""
    both = placed = 0
    for i, s in enumerate(scenes):
        units = () if settings is None else (unit(s, **settings),)
        verdict = follows(engine, s, prompt.format(colour=s.objects[0].colour), i, units, cfg_scale)
        both += all(verdict.values())
        placed += verdict["position"]
    return both / len(scenes), placed / len(scenes)


def contradiction(engine, scenes: list[Scene], settings: dict, weight: float) -> tuple[float, float]:
    """Shares of pictures drawing A's shape (the edges') and B's (the prompt's), prompt "a <colour> <B>"."""
    edges = prompt = 0
    for i, s in enumerate(scenes):
        a = s.objects[0]
        b = random.Random(f"contradiction:{i}").choice([x for x in SHAPES if x != a.shape])
        units = (unit(s, weight, **settings),)
        found = detect(draw(engine, f"a {a.colour} {b}", i, units))[1]
        drawn = found[0].shape if found else None
        edges += drawn == a.shape
        prompt += drawn == b
    return edges / len(scenes), prompt / len(scenes)


def adherence_table(engine, scenes: list[Scene], prompt: str) -> list[str]:
    """Shape and position at guidance end 1 and 0.5, and the position alone (the composition) at 0.5."""
    alone = adherence(engine, scenes, None, prompt)
    lines = [f"## Shape and position of the edges' scene (prompt: \"{prompt}\", {cfg_words()})", "",
             "| unit | guidance end 1 | guidance end 0.5 | position only, guidance end 0.5 |", "|---|---|---|---|",
             f"| none (the base model alone) | {alone[0]:.2f} | | {alone[1]:.2f} |"]
    for name, settings in UNITS.items():
        full = adherence(engine, scenes, settings, prompt)[0]
        half, placed = adherence(engine, scenes, {**settings, "guidance_end": 0.5}, prompt)
        lines.append(f"| {name} | {full:.2f} | {half:.2f} | {placed:.2f} |")
        print(lines[-1], flush=True)
    return lines


def contradiction_table(engine, scenes: list[Scene]) -> list[str]:
    lines = [f"## Contradiction: prompt \"a <colour> <shape B>\", edges of shape A ({len(scenes)} scenes per weight, "
             f"{cfg_words()})",
             "", "| unit | " + " | ".join(f"weight {w}" for w in WEIGHTS) + " |", "|---|" + "---|" * len(WEIGHTS)]
    for name, settings in UNITS.items():
        cells = [contradiction(engine, scenes, settings, w) for w in WEIGHTS]
        lines.append(f"| {name}: A (edges) / B (prompt) | " + " | ".join(f"{a:.2f} / {b:.2f}" for a, b in cells) + " |")
        print(lines[-1], flush=True)
    return lines


def cfg_table(engine, scenes: list[Scene], prompt: str, scales: list[float]) -> list[str]:
    lines = [f"## CFG scale: pixel perfect, guidance end 1, prompt \"{prompt}\" ({len(scenes)} other held-out scenes)",
             "", "| CFG scale | " + " | ".join(f"{s:g}" for s in scales) + " |", "|---|" + "---|" * len(scales)]
    shares = [adherence(engine, scenes, UNITS["pixel perfect"], prompt, s)[0] for s in scales]
    lines.append("| shape and position | " + " | ".join(f"{a:.2f}" for a in shares) + " |")
    print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=100, help="held-out scenes for adherence and guidance end")
    parser.add_argument("--contradictions", type=int, default=50, help="scenes per weight of the contradiction "
                                                                       "sweep (0: no sweep)")
    parser.add_argument("--prompt", default="a {colour}", help="the prompt of parts 1 and 3 ({colour}: scene A's)")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".md")))
    parser.add_argument("--controlnet", default=SHIPPED, help="the ControlNet: a name or a file (default: the shipped)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="CFG scale of parts 1-3 (default: the model's)")
    parser.add_argument("--cfg-sweep", default="", help="comma-separated CFG scales of part 4 (default: no sweep)")
    parser.add_argument("--sweep-scenes", type=int, default=100, help="held-out scenes of the CFG sweep")
    args = parser.parse_args()
    global MODEL, CFG
    MODEL, CFG = args.controlnet, args.cfg_scale
    started = time.perf_counter()
    engine = runtime.prepare(plainsd.load(dtype=runtime.choose_dtype("auto")))  # as `plainsd txt2img` runs
    scenes = held_out_scenes(args.scenes, 1)
    command = f"--scenes {args.scenes} --contradictions {args.contradictions}"
    command += f" --prompt '{args.prompt}'" if args.prompt != "a {colour}" else ""
    command += f" --controlnet {args.controlnet}" if args.controlnet != SHIPPED else ""
    command += f" --cfg-scale {args.cfg_scale:g}" if args.cfg_scale else ""
    command += f" --cfg-sweep {args.cfg_sweep} --sweep-scenes {args.sweep_scenes}" if args.cfg_sweep else ""
    lines = [f"# ControlNet adherence: {MODEL} on the shipped model", "",
             f"`.venv/bin/python benchmarks/controlnet_adherence.py {command}` on {cpu_name()}, {os.cpu_count()} cores, "
             f"{str(engine.sd.dtype).replace('torch.', '')} (the default runtime); the method in the script's "
             "docstring.", ""]
    if args.scenes:
        lines += adherence_table(engine, scenes, args.prompt)
    if args.contradictions:
        lines += [""] + contradiction_table(engine, held_out_scenes(args.contradictions, 1))
    if args.cfg_sweep:
        others = held_out_scenes(args.sweep_scenes, 1, seed=CFG_CHOICE_SEED)
        lines += [""] + cfg_table(engine, others, args.prompt, [float(s) for s in args.cfg_sweep.split(",")])
    lines += ["", f"{time.perf_counter() - started:.0f} s in all."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
