"""Prompt adherence of the shipped model with each part of fast mode, and token merging, on and off (the README's
fast-mode table).

    .venv/bin/python benchmarks/fast_adherence.py            # about 8 minutes on 2 cores
    .venv/bin/python benchmarks/fast_adherence.py --prompts 100

The same held-out single-object prompts and seeds as `plainsd eval` (200 by default: the first 100 are
eval's), judged the same way; the default (exact) path at the precision `--precision auto` picks.
"""

from __future__ import annotations

import argparse
import sys

import torch

import plainsd
from plainsd import runtime
from plainsd.eval import metrics
from plainsd.fast import FAST, FastSettings, choose

# name: (fast-mode settings or None for the exact path, guidance_until or None for the model's recommendation).
# The parts of fast mode come on top of the model's recommended settings; the shipped model's card already
# stops guidance after 60% of the steps, so fast mode's own guidance cut-off changes nothing on it.
VARIANTS = {
    "default path": (None, None),
    "default path, guidance on every step": (None, 1.0),
    "DeepCache, whole UNet every 3rd step": (FastSettings(deepcache_interval=3, guidance_until=1.0, tiny_decoder=False), None),
    "DeepCache, whole UNet every 2nd step": (FastSettings(deepcache_interval=2, guidance_until=1.0, tiny_decoder=False), None),
    "guidance for the first 60% only": (FastSettings(deepcache_interval=1, guidance_until=0.6, tiny_decoder=False), None),
    "tiny decoder only (--tiny-decoder)": (choose(False, tiny_decoder=True), None),
    "fast mode (--fast): 2 blocks on the first 40% of the steps, 1 after; the whole UNet every 4th step on the last 40%": (FAST, None),
    "fast mode, the whole UNet every 2nd step to the end (--fast before 2026-12-04)": (FastSettings(deepcache_early=0.4), None),
    "fast mode, 1 block throughout (--fast before 2026-12-03)": (FastSettings(), None),
    "fast mode, 2 blocks throughout": (FastSettings(deepcache_depth=2), None),
    "fast mode, 2 blocks on the first 60% of the steps": (FastSettings(deepcache_early=0.6), None),
    "fast mode, 1 block throughout, the last step whole (20 steps)": (FastSettings(deepcache_end=0.05), None),
    "fast mode, 1 block throughout, the last 10% of the steps whole": (FastSettings(deepcache_end=0.1), None),
    "fast mode and the tiny decoder (--fast --tiny-decoder)": (choose(True, tiny_decoder=True), None),
}
# token merging (A1111's ratio, --token-merging) on the default path: name -> ratio
TOKEN_MERGING = {f"token merging {r:g} (--token-merging {r:g})": r for r in (0.3, 0.5, 0.75)}
# fast mode with token merging too (the share of a step fast mode leaves is mostly the full-resolution level's)
FAST_TOKEN_MERGING = {"fast mode and token merging 0.5 (--fast --token-merging 0.5)": (FAST, 0.5)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--model", help="a checkpoint (default: the shipped model); its tiny decoder is the "
                                    "NAME.taesd.safetensors beside it")
    p.add_argument("--only", nargs="+", choices=list(VARIANTS) + list(TOKEN_MERGING) + list(FAST_TOKEN_MERGING),
                   help="run only these rows")
    args = p.parse_args()
    engine = runtime.prepare(plainsd.load(args.model, dtype=runtime.choose_dtype("auto")))
    print(f"Recommended settings of the model: {engine.sd.defaults}\n")
    print("| setting | colour and shape | position | size | all four |\n|---|---|---|---|---|")
    rows = {**VARIANTS, **{name: (None, None, ratio) for name, ratio in TOKEN_MERGING.items()},
            **{name: (settings, None, ratio) for name, (settings, ratio) in FAST_TOKEN_MERGING.items()}}
    for name, (settings, guidance_until, *merging) in rows.items():
        if args.only and name not in args.only:
            continue
        with torch.no_grad():
            r = metrics.adherence(engine, args.prompts, 1, fast=settings or False, guidance_until=guidance_until,
                                  token_merging=merging[0] if merging else 0.0)
        print(f"| {name} | {r['colour_and_shape']:.3f} | {r['position']:.3f} | {r['size']:.3f} | {r['all']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
