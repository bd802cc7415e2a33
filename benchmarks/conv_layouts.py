"""Why plainsd packs a convolution for its input's shape: SD's 3x3 convolutions plain and packed, per input size.

    .venv/bin/python benchmarks/conv_layouts.py                 # float32, about 2 minutes on 2 cores
    .venv/bin/python benchmarks/conv_layouts.py --dtype bf16    # where the CPU has native bf16

For each convolution (input channels -> output channels, batch 2 as with CFG, channels-last) and each input
size s: the plain layer (torch hands oneDNN the plain weight, which it copies into its own layout at every
call), then the weight packed once with torch.ops.mkldnn._reorder_convolution_weight for an input of h x h,
for each h. oneDNN picks the layout for the size it is told; the column where h = s is what
runtime.PackedConv2d runs. Milliseconds, the best of 3 calls. Not part of the tests.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SIZES = [4, 8, 16, 32, 64]
CONVS = [(1920, 1280), (2560, 1280), (1280, 1280), (960, 640), (640, 320), (320, 320)]


def _best_ms(f, calls: int = 3) -> float:
    f()
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    mk = torch.ops.mkldnn
    torch.manual_seed(0)
    print(f"3x3 convolutions, {args.dtype}, {torch.get_num_threads()} threads; ms per call (command: "
          f".venv/bin/python benchmarks/conv_layouts.py --dtype {args.dtype})\n")
    print("| conv | input | plain | " + " | ".join(f"packed for {h}x{h}" for h in SIZES) + " |")
    print("|---|---|---|" + "---|" * len(SIZES))
    with torch.inference_mode():
        for c, co in CONVS:
            w = (torch.randn(co, c, 3, 3) * 0.05).to(dtype).contiguous(memory_format=torch.channels_last)
            bias = torch.randn(co).to(dtype)
            packed = {h: mk._reorder_convolution_weight(w, [1, 1], [1, 1], [1, 1], 1, [2, c, h, h]) for h in SIZES}
            for s in SIZES:
                if c * s * s > 1280 * 32 * 32:  # SD1.5 at 512x512 has no larger input for these
                    continue
                x = torch.randn(2, c, s, s).to(dtype).contiguous(memory_format=torch.channels_last)
                row = [_best_ms(lambda: F.conv2d(x, w, bias, padding=1))]
                row += [_best_ms(lambda: mk._convolution_pointwise(x, packed[h], bias, [1, 1], [1, 1], [1, 1], 1,
                                                                   "none", [], "")) for h in SIZES]
                print(f"| {c}->{co} | {s}x{s} | " + " | ".join(f"{t:.1f}" for t in row) + " |", flush=True)


if __name__ == "__main__":
    main()
