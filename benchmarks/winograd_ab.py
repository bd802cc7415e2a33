"""Winograd's convolutions against the direct ones, UNet step against UNet step in one process.

    .venv/bin/python benchmarks/winograd_ab.py --preset sdxl --size 1024 --out benchmarks/winograd_ab-sdxl-avx2.md
    .venv/bin/python benchmarks/winograd_ab.py --preset sd15 --size 512

plainsd's default path for this CPU on the benchmarks' random weights (sdxl_speed.py's SDXL file, speed.py's
SD1.5 checkpoint; run those once to write them), one UNet step with CFG (batch 2) at a time, alternating between
the direct convolutions (runtime/winograd.py's MIN_CHANNELS raised past every layer) and Winograd's (the
default), after one untimed step of each; each setting goes first in every other pair. Separate processes a few
minutes apart differ by up to 10-15% on a shared machine (benchmarks/alternate.py's doc); here both settings
share the process, the weights and the input, and what counts is the median of the pairs' ratios.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import CACHE, ROOT, _checkpoint, cpu_name, flags_shown  # noqa: E402


def _step(preset: str, size: int):
    """A function running one UNet step with CFG on plainsd's default path, and a description of the weights."""
    import torch

    import plainsd
    from plainsd import runtime, weights

    if preset == "sdxl":
        from sdxl_speed import _inputs

        from plainsd.config import preset as config_of
        from plainsd.models.sdxl import vector

        path = CACHE / "sdxl-random.safetensors"
        if not path.exists():
            raise SystemExit(f"{path} is missing: run benchmarks/sdxl_speed.py once to write it")
        engine = runtime.prepare(plainsd.load(path, dtype=runtime.choose_dtype("auto", weights.read_config(path))))
        x, t, c, pooled, numbers = _inputs(config_of("sdxl").unet, size)
        dtype = engine.sd.unet.dtype
        y = vector(pooled, numbers).to(dtype)
        return lambda: engine.unet(x.to(dtype), t, c.to(dtype), y=y), f"{path.name} ({engine.load_dtype})"
    path = _checkpoint()
    engine = runtime.prepare(plainsd.load(path, dtype=runtime.choose_dtype("auto")))
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, size // 8, size // 8, generator=g), torch.randn(2, 77, 768, generator=g)
    dtype = engine.sd.unet.dtype
    return lambda: engine.unet(x.to(dtype), torch.tensor([500.0, 500.0]), c.to(dtype)), f"{path.name} ({dtype})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=("sd15", "sdxl"), default="sd15")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default=None, help="write the table to this file too")
    args = p.parse_args(argv)
    if args.pairs < 1:
        p.error("--pairs must be at least 1")
    argv = sys.argv[1:] if argv is None else list(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as speed.py's workers
    sys.path.insert(0, str(ROOT / "src"))
    from plainsd.runtime import winograd

    step, weights_name = _step(args.preset, args.size)
    settings = {"direct": sys.maxsize, "winograd": winograd.MIN_CHANNELS}
    times = {name: [] for name in settings}
    with torch.inference_mode():
        for channels in settings.values():  # untimed: packs the weights for the direct ones, makes the kept filters
            winograd.MIN_CHANNELS = channels
            step()
        for pair in range(args.pairs):
            for name in (list(settings) if pair % 2 == 0 else list(reversed(settings))):  # each first in turn
                winograd.MIN_CHANNELS = settings[name]
                time.sleep(1)
                started = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - started)
                print(f"pair {pair + 1}: {name} {times[name][-1]:.2f} s", flush=True)
    ratios = [d / w for d, w in zip(times["direct"], times["winograd"])]
    lines = [f"Machine: {cpu_name()} ({flags_shown()}), {args.threads} threads, torch {torch.__version__}; "
             f"{weights_name}; command: `.venv/bin/python benchmarks/winograd_ab.py {shlex.join(argv)}`",
             "", f"{args.preset} UNet step with CFG (batch 2) at {args.size}x{args.size}, plainsd's default path, "
             f"{args.pairs} pairs in one process", "",
             "| convolutions | s/step, each pair | median |", "|---|---|---|"]
    for name in settings:
        shown = ", ".join(f"{s:.2f}" for s in times[name])
        lines.append(f"| {name} | {shown} | {statistics.median(times[name]):.2f} |")
    lines += ["", f"Winograd's speed-up (direct / winograd, median of the pairs): {statistics.median(ratios):.3f}x "
              f"(pairs: {', '.join(f'{r:.3f}' for r in ratios)})"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
