"""Why plainsd packs a convolution for its input's shape: SD's 3x3 convolutions plain and packed, per input size.

    .venv/bin/python benchmarks/conv_layouts.py                 # float32, about 2 minutes on 2 cores
    .venv/bin/python benchmarks/conv_layouts.py --dtype bf16    # where the CPU has native bf16
    .venv/bin/python benchmarks/conv_layouts.py --dtype bf16 --batch         # packed for one batch size, run at another
    .venv/bin/python benchmarks/conv_layouts.py --dtype bf16 --batch --unet  # and a whole UNet step after a batch change

For each convolution (input channels -> output channels, batch 2 as with CFG, channels-last) and each input
size s: the plain layer (torch hands oneDNN the plain weight, which it copies into its own layout at every
call), then the weight packed once with torch.ops.mkldnn._reorder_convolution_weight for an input of h x h,
for each h. oneDNN picks the layout for the size it is told; the column where h = s is what
runtime.packing.PackedConv2d runs. Milliseconds, the best of 3 calls. Not part of the tests.

--batch: each convolution at each size packed for batch 1 and for batch 2, run at both
(runtime.packing._layout_key keeps a bf16 layout across batch sizes). ONEDNN_MAX_CPU_ISA (AVX2, AVX512_CORE_BF16, ...) holds oneDNN to an older
instruction set, to see what such a CPU would pick. --unet adds SD1.5's UNet (speed.py's checkpoint with random
weights, 512x512) run at batch 2, 1, 2, 1 as a sampler whose guidance stops part of the way does: seconds per
call with plainsd's layout key and with the whole shape as key (a repack at every change of batch size).
"""

from __future__ import annotations

import argparse
import os
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


def _batches(dtype, name: str) -> None:
    mk = torch.ops.mkldnn
    print(f"3x3 convolutions, {name}, {torch.get_num_threads()} threads, ONEDNN_MAX_CPU_ISA="
          f"{os.environ.get('ONEDNN_MAX_CPU_ISA', '(unset)')}; ms per call (command: .venv/bin/python "
          f"benchmarks/conv_layouts.py --dtype {name} --batch)\n")
    print("| conv | input | batch | packed for its batch | packed for the other | ratio |\n|---|---|---|---|---|---|")
    worst = 0.0
    with torch.inference_mode():
        for c, co in CONVS:
            w = (torch.randn(co, c, 3, 3) * 0.05).to(dtype).contiguous(memory_format=torch.channels_last)
            bias = torch.randn(co).to(dtype)
            for s in SIZES:
                if c * s * s > 1280 * 32 * 32:
                    continue
                packed = {n: mk._reorder_convolution_weight(w, [1, 1], [1, 1], [1, 1], 1, [n, c, s, s]) for n in (1, 2)}
                for n in (1, 2):
                    x = torch.randn(n, c, s, s).to(dtype).contiguous(memory_format=torch.channels_last)
                    own, other = (_best_ms(lambda: mk._convolution_pointwise(x, packed[m], bias, [1, 1], [1, 1], [1, 1],
                                                                             1, "none", [], "")) for m in (n, 3 - n))
                    worst = max(worst, other / own)
                    print(f"| {c}->{co} | {s}x{s} | {n} | {own:.2f} | {other:.2f} | {other / own:.2f} |", flush=True)
    print(f"\nThe largest ratio: {worst:.2f}")


def _unet_switch(dtype) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import plainsd
    from plainsd import runtime
    from plainsd.runtime import packing
    from speed import _checkpoint

    sd = runtime.prepare(plainsd.load(_checkpoint(), dtype=dtype), "eager").sd
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(2, 4, 64, 64, generator=g), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768, generator=g)
    keyed = packing._layout_key
    print("\nSD1.5 UNet at 512x512, s per call at batch 2, 2, 1, 1, 2, 2, 1, 1 (the first call packs)\n")
    print("| layout key | " + " | ".join(["2", "2", "1", "1", "2", "2", "1", "1"]) + " |\n|---|" + "---|" * 8)
    for name, key in (("plainsd's (runtime.packing._layout_key)", keyed), ("the whole shape", lambda x: tuple(x.shape))):
        packing._layout_key = key
        runtime.unpack_weights(sd.unet), runtime.pack_weights(sd.unet)  # packed afresh: the first call packs
        times = []
        with torch.inference_mode():
            for n in (2, 2, 1, 1, 2, 2, 1, 1):
                t0 = time.perf_counter()
                sd.unet(x[:n], t[:n], c[:n])
                times.append(time.perf_counter() - t0)
        print(f"| {name} | " + " | ".join(f"{s:.2f}" for s in times) + " |", flush=True)
    packing._layout_key = keyed


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", action="store_true", help="packed for one batch size, run at the other")
    p.add_argument("--unet", action="store_true", help="with --batch: a whole UNet after each change of batch size")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.batch:
        torch.manual_seed(0)
        _batches(dtype, args.dtype)
        if args.unet:
            _unet_switch(dtype)
        return
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
