"""Prompt editing on the shipped model: `[a red circle:a blue circle:WHEN]` switches the text after that fraction of
the steps; the judge reads the colour of the largest object. An early switch should give a blue circle (the colour
is settled in the late part of the schedule), a late one a red circle (it was settled before the switch).

    .venv/bin/python benchmarks/prompt_editing.py              # 50 seeds per prompt (prints a table)
    .venv/bin/python benchmarks/prompt_editing.py --seeds 10 --when 0.3 0.5 0.9

The shipped model's recommended settings (20 steps of DPM++ 2M karras, CFG 5 for the first 60% of the steps), seeds
0..N-1, the default path as `plainsd txt2img --sampler "DPM++ 2M"` runs it.
"""

from __future__ import annotations

import argparse
from collections import Counter

import plainsd
from plainsd import runtime
from plainsd.eval.judge import detect
from plainsd.pipeline import txt2img


def colours(engine, prompt: str, seeds: int) -> Counter:
    """How often the judge reads each colour for the largest object (None: no object found)."""
    found = Counter()
    for seed in range(seeds):
        objects = detect(txt2img(engine, prompt, seed=seed, sampler="DPM++ 2M").images[0])[1]
        found[objects[0].colour if objects else None] += 1
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=50)
    parser.add_argument("--when", type=float, nargs="+", default=[0.3, 0.9])
    args = parser.parse_args()
    engine = runtime.prepare(plainsd.load())
    print("| prompt | red | blue | other |\n|---|---|---|---|")
    for when in args.when:
        prompt = f"[a red circle:a blue circle:{when}]"
        c = colours(engine, prompt, args.seeds)
        other = args.seeds - c["red"] - c["blue"]
        print(f"| `{prompt}` | {c['red']}/{args.seeds} | {c['blue']}/{args.seeds} | {other}/{args.seeds} |", flush=True)


if __name__ == "__main__":
    main()
