"""Prompt adherence of the shipped model with each part of fast mode on and off (the README's fast-mode table).

    .venv/bin/python benchmarks/fast_adherence.py            # about 10 minutes on 2 cores

The same 100 held-out single-object prompts and seeds as `plainsd eval`, judged the same way; the default
(exact) path at the precision `--precision auto` picks.
"""

from __future__ import annotations

import sys

import torch

import plainsd
from plainsd import runtime
from plainsd.eval import metrics
from plainsd.fast import FAST, FastSettings

VARIANTS = {
    "default path": None,
    "DeepCache only": FastSettings(guidance_until=1.0, tiny_decoder=False),
    "guidance for the first 60% only": FastSettings(deepcache_interval=1, guidance_until=0.6, tiny_decoder=False),
    "tiny decoder only": FastSettings(deepcache_interval=1, guidance_until=1.0),
    "DeepCache + tiny decoder": FastSettings(guidance_until=1.0),
    "fast mode (--fast)": FAST,
}


def main() -> int:
    sd = runtime.prepare(plainsd.load(dtype=runtime.choose_dtype("auto")))
    print("| setting | colour and shape | position | size | all four |\n|---|---|---|---|---|")
    for name, settings in VARIANTS.items():
        with torch.no_grad():
            r = metrics.adherence(sd, 100, 1, fast=settings or False)
        print(f"| {name} | {r['colour_and_shape']:.2f} | {r['position']:.2f} | {r['size']:.2f} | {r['all']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
