"""Token merging's speed: the default path's UNet step with CFG at each merging ratio, side by side in one process.

    .venv/bin/python benchmarks/tome_speed.py                          # 512x512 and 768x768, about 15 minutes in fp32
    .venv/bin/python benchmarks/tome_speed.py --sizes 512 --rounds 3

Runs on speed.py's SD1.5-size checkpoint with random weights (benchmarks/.cache; speed.py writes it, or this
script does on its first run). Each round times one step at every ratio, in turn (the order rotates from round
to round); the table is the median of the rounds, and the speed-up is against ratio 0 (no merging) of the same
rounds. Token merging changes the picture (the README measures by how much on the shipped model); this is only
its time. Writes benchmarks/tome_speed.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from speed import ROOT, _checkpoint, cpu_name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="512,768")
    p.add_argument("--ratios", default="0,0.3,0.5,0.75")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "src"))
    import plainsd
    from plainsd import runtime as rt

    dtype = rt.choose_dtype(args.precision)
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    sd = rt.prepare(plainsd.load(_checkpoint(), dtype=dtype), "eager").sd
    ratios = [float(r) for r in args.ratios.split(",")]
    if 0.0 not in ratios:
        ratios.insert(0, 0.0)
    command = " ".join(["benchmarks/tome_speed.py"] + (argv if argv is not None else sys.argv[1:]))
    lines = [f"Command: `.venv/bin/python {command}`; {cpu_name()}, {args.threads} threads, {precision}; "
             f"UNet step with CFG (batch 2), median of {args.rounds} rounds", ""]
    for size in (int(s) for s in args.sizes.split(",")):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, size // 8, size // 8, generator=g)
        t, c = torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768, generator=g)
        times: dict[float, list[float]] = {r: [] for r in ratios}
        with torch.inference_mode():
            for r in ratios:  # the first steps at a new size (packing, first touch of memory) are not timed
                sd.unet.set_token_merging(r)
                sd.unet(x, t, c)
            for i in range(args.rounds):
                for r in ratios[i % len(ratios):] + ratios[:i % len(ratios)]:
                    sd.unet.set_token_merging(r)
                    time.sleep(0.5)
                    t0 = time.perf_counter()
                    sd.unet(x, t, c)
                    times[r].append(time.perf_counter() - t0)
                    print(f"{size} ratio {r}: {times[r][-1]:.2f} s", file=sys.stderr, flush=True)
        sd.unet.set_token_merging(0.0)
        base = statistics.median(times[0.0])
        lines += [f"{size}x{size} ({(size // 8) ** 2} tokens at the full-resolution level)", "",
                  "| token merging ratio | s/step | speed-up |", "|---|---|---|"]
        for r in ratios:
            med = statistics.median(times[r])
            lines.append(f"| {r:g}{' (off)' if r == 0 else ''} | {med:.2f} | {base / med:.2f}x |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    (ROOT / "benchmarks" / "tome_speed.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
