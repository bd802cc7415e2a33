"""plainsd's default path and OpenVINO in the same precision in one process, UNet step against UNet step.

    .venv/bin/python benchmarks/alternate.py                 # 512x512, 20 pairs (about 3 minutes with bf16)
    .venv/bin/python benchmarks/alternate.py --size 256 --pairs 40
    .venv/bin/python benchmarks/alternate.py --precision fp32

The precision is plainsd's default for this CPU (bf16 where it has native bf16, else fp32) unless --precision
says otherwise; OpenVINO gets the same as its inference precision hint.

speed.py measures each runtime in its own fresh process, a few minutes apart; this machine's speed drifts by
10-15% within an hour, so two rounds of its table can disagree by more than the runtimes differ. Here both run
in one process on the same weights and input (speed.py's checkpoint and OpenVINO's converted IR), a step of one
right after a step of the other, with a pause between so that neither's idle threads spin into the other's
time; what counts is the median of the pairs' ratios (plainsd's step / OpenVINO's step, below 1 = plainsd
faster). Needs openvino and the test extras, as speed.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from speed import ROOT, _checkpoint, _OVUNet


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "src"))
    import plainsd
    from plainsd import runtime as rt

    checkpoint = _checkpoint()
    dtype = rt.choose_dtype(args.precision)
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    sd = rt.prepare(plainsd.load(checkpoint, dtype=dtype), "eager").sd
    ov = _OVUNet(checkpoint, precision, args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, args.size // 8, args.size // 8, generator=g)
    t, c = torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768, generator=g)
    runs = {f"plainsd {precision}": lambda: sd.unet(x, t, c), f"OpenVINO {precision}": lambda: ov(x, t, c)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for f in runs.values():  # compile, first touch of memory
            f(), f()
        for i in range(args.pairs):
            for name, f in (runs.items() if i % 2 == 0 else reversed(runs.items())):  # each goes first half the time
                time.sleep(0.5)
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
    ours, theirs = times.values()
    ratios = sorted(a / b for a, b in zip(ours, theirs))
    print(f"UNet step with CFG at {args.size}x{args.size}, {args.threads} threads, {args.pairs} pairs in one process "
          f"(command: .venv/bin/python benchmarks/alternate.py --size {args.size} --pairs {args.pairs} "
          f"--precision {args.precision})")
    for name, ts in times.items():
        print(f"  {name}: median {statistics.median(ts):.3f} s, fastest {min(ts):.3f} s")
    print(f"  plainsd / OpenVINO per pair: median {statistics.median(ratios):.3f} "
          f"(quartiles {ratios[len(ratios) // 4]:.3f} - {ratios[3 * len(ratios) // 4]:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
