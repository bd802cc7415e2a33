"""The shipped model's LCM-LoRA: how well does it draw in 1, 2, 4 and 8 steps, against the 20-step default?

Held-out single-object prompts (metrics.held_out_scenes: seeds no training recipe uses; the same 100 as the model
card's figures), the judge reading colour and shape, position and size of each picture. Rows:

- the 20-step path: the shipped model's recommended settings for its own sampler (20 steps of DPM++ 2M karras, CFG
  5 until 60%; with the sampler left out it recommends the LCM-LoRA's row of 4 steps);
- the LCM-LoRA: `<lora:NAME:1>` in the prompt, sampler LCM (its own schedule, normal: timesteps 999, 679, 339
  and 19 at 4 steps), CFG 1 (one UNet call per step), 1, 2, 4 and 8 steps;
- without the LoRA, for comparison: the base model with the LCM sampler at 4 steps, and with its own sampler
  (DPM++ 2M karras, CFG 5 until 60%) at 4 steps.

Every picture goes through the public pipeline (txt2img) on the default runtime, as `plainsd txt2img` runs; the
seed of prompt i's picture is i. Seconds per picture are the mean over the row's pictures, 64x64.

    .venv/bin/python benchmarks/lcm_adherence.py                       # the shipped LoRA; writes the .md
    .venv/bin/python benchmarks/lcm_adherence.py --lora runs/lcm/lcm-lora.safetensors --prompts 50 --out /tmp/x.md
    .venv/bin/python benchmarks/lcm_adherence.py --teacher --prompts 50 --out /tmp/teacher.md   # the ceiling
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

import plainsd
from plainsd import runtime
from plainsd.eval.judge import judge
from plainsd.eval.metrics import _scores, _shares, held_out_scenes
from plainsd.pipeline import txt2img
from plainsd.runtime import cpu_name


SHIPPED = Path(plainsd.__file__).parent / "data" / "plainsd-base.lcm-lora.safetensors"
# The shipped model adds its LCM-LoRA to a prompt run with the LCM sampler (pipeline.model_recommendations) unless the
# prompt names it; this tag, at weight 0, keeps it out of the rows that measure something else.
WITHOUT_SHIPPED = f" <lora:{SHIPPED.stem}:0>"
FULL = dict(sampler="DPM++ 2M")  # the 20-step settings: the shipped model's recommendations for its own sampler
STEPS = (1, 2, 4, 8)


def measure(engine, scenes, tag: str = "", lora_dir: Path | None = None, **settings) -> tuple[dict, float]:
    """The judge's shares over the scenes' pictures, and the mean seconds per picture."""
    tallies, started = [], time.perf_counter()
    for i, scene in enumerate(scenes):
        picture = txt2img(engine, scene.caption + tag, seed=i, lora_dir=lora_dir, **settings).images[0]
        tallies.append(_scores(judge(picture, scene)))
    return _shares(tallies), (time.perf_counter() - started) / len(scenes)


def rows(engine, scenes, lora: Path, steps=STEPS, baselines: bool = True):
    tag = f" <lora:{lora.stem}:1>" + (WITHOUT_SHIPPED if lora.resolve() != SHIPPED.resolve() else "")
    lcm = dict(sampler="LCM", cfg_scale=1.0)
    if baselines:
        yield "20-step path: 20 steps DPM++ 2M karras, CFG 5 until 60%", measure(engine, scenes, **FULL)
    for n in steps:
        yield f"LCM-LoRA, LCM, CFG 1, {n} step{'s' * (n > 1)}", measure(engine, scenes, tag, lora.parent, steps=n, **lcm)
    if baselines:
        yield "no LoRA: LCM, CFG 1, 4 steps", measure(engine, scenes, WITHOUT_SHIPPED, steps=4, **lcm)
        yield "no LoRA: DPM++ 2M karras, CFG 5 until 60%, 4 steps", measure(engine, scenes, steps=4, **FULL)


def teacher_rows(engine, scenes):
    """The ceiling of a distillation: the trajectories the teacher's solver follows, run to the end on LCM's grid
    of 50 timesteps (the ddim schedule), guided as the lcm recipe guides (above t = 200: 80% of the steps)."""
    for cfg in (2.0, 5.0):
        for sampler in ("DDIM", "Heun"):
            yield (f"teacher: {sampler}, 50 steps on the ddim schedule, CFG {cfg:g} until 80%",
                   measure(engine, scenes, sampler=sampler, schedule="ddim", steps=50, cfg_scale=cfg,
                           guidance_until=0.8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora", default=str(SHIPPED), help="the LCM-LoRA file (default: the shipped one)")
    parser.add_argument("--prompts", type=int, default=100, help="held-out single-object prompts")
    parser.add_argument("--steps", default=",".join(map(str, STEPS)),
                        help="the LoRA's step counts, comma-separated (default: 1,2,4,8)")
    parser.add_argument("--no-baselines", action="store_true",
                        help="only the LoRA's rows (to follow a training's checkpoints)")
    parser.add_argument("--teacher", action="store_true",
                        help="measure the distillation's teacher trajectories instead of the LoRA (teacher_rows)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=str(Path(__file__).with_suffix(".md")))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lora = Path(args.lora)
    engine = runtime.prepare(plainsd.load(dtype=runtime.choose_dtype("auto")))  # as `plainsd txt2img` runs
    scenes = held_out_scenes(args.prompts, 1)
    command = "" if lora == SHIPPED else f" --lora {args.lora}"
    command += f" --prompts {args.prompts}" if args.prompts != 100 else ""
    command += " --teacher" if args.teacher else ""
    command += f" --steps {args.steps}" if args.steps != parser.get_default("steps") else ""
    command += " --no-baselines" if args.no_baselines else ""
    steps = [int(n) for n in args.steps.split(",")]
    title = "the distillation's teacher" if args.teacher else lora.name
    lines = [f"# LCM-LoRA adherence: {title} on the shipped model", "",
             f"`.venv/bin/python benchmarks/lcm_adherence.py{command}` on {cpu_name()}, {os.cpu_count()} cores, "
             f"{str(engine.sd.dtype).replace('torch.', '')} (the default runtime), {args.prompts} held-out "
             "single-object prompts; the method in the script's docstring.", "",
             "| settings | colour and shape | position | size | s / picture |", "|---|---|---|---|---|"]
    for name, (shares, seconds) in (teacher_rows(engine, scenes) if args.teacher else
                                    rows(engine, scenes, lora, steps, not args.no_baselines)):
        lines.append(f"| {name} | {shares['colour_and_shape']:.2f} | {shares['position']:.2f} | "
                     f"{shares['size']:.2f} | {seconds:.3f} |")
        print(lines[-1], flush=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
