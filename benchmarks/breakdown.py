"""Where a UNet step's time goes: plainsd's default path against OpenVINO in the same precision, part by part.

    .venv/bin/python benchmarks/breakdown.py            # 512x512 and 256x256, about 3 minutes
    .venv/bin/python benchmarks/breakdown.py --sizes 256 --precision fp32

The precision is plainsd's default for this CPU (bf16 where it has native bf16, else fp32) unless --precision
says otherwise; OpenVINO gets the same as its inference precision hint.

Runs on the files benchmarks/speed.py leaves in benchmarks/.cache (the SD1.5-size checkpoint with random
weights and OpenVINO's conversion of diffusers' UNet): run that once first. plainsd's parts are timed with
forward hooks on its modules (the best of --repeats steps); OpenVINO's from its own per-node profile
(PERF_COUNT), grouped by the diffusers module names its nodes keep. OpenVINO's per-node times add up to a
little more than its wall-clock step (the profile's own cost), so compare parts as shares as well as in ms.
Both in one process, one after the other, with the same thread count.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache"
PARTS = ["ResBlocks", "self-attention", "cross-attention", "feed-forward", "transformer, other", "up/down-sampling",
         "other"]


def _plainsd_parts(size: int, repeats: int, dtype) -> tuple[float, dict[str, float]]:
    import torch

    import plainsd
    from plainsd import runtime
    from plainsd.models import unet as U

    sd = runtime.prepare(plainsd.load(CACHE / "sd15-random.safetensors", dtype=dtype), "eager").sd
    times: dict[str, float] = collections.defaultdict(float)
    starts = {}

    def hook(part):
        def pre(module, args):
            starts[module] = time.perf_counter()

        def post(module, args, out):
            times[part] += time.perf_counter() - starts[module]
        return pre, post

    for name, module in sd.unet.named_modules():
        part = ("ResBlocks" if isinstance(module, U.ResBlock) else "self-attention" if name.endswith("attn1")
                else "cross-attention" if name.endswith("attn2") else "feed-forward" if name.endswith(".ff")
                else "transformer" if isinstance(module, U.SpatialTransformer)
                else "up/down-sampling" if isinstance(module, (U.Downsample, U.Upsample))
                else "step" if module is sd.unet else None)
        if part:
            pre, post = hook(part)
            module.register_forward_pre_hook(pre)
            module.register_forward_hook(post)
    x, t, c = _inputs(size)
    best: dict[str, float] = {}
    with torch.inference_mode():
        sd.unet(x, t, c)
        for _ in range(repeats):
            times.clear()
            sd.unet(x, t, c)
            if not best or times["step"] < best["step"]:
                best = dict(times)
    parts = {p: best.get(p, 0.0) for p in PARTS}
    parts["transformer, other"] = best["transformer"] - sum(best.get(p, 0.0) for p in
                                                            ("self-attention", "cross-attention", "feed-forward"))
    parts["other"] = best["step"] - best["ResBlocks"] - best["transformer"] - best["up/down-sampling"]
    return best["step"], parts


def _openvino_parts(size: int, repeats: int, threads: int, precision: str) -> tuple[float, dict[str, float]]:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(CACHE / "ov-diffusers-unet" / "unet.xml")
    model.reshape({0: [2, 4, size // 8, size // 8], 1: [2], 2: [2, 77, 768]})
    config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True}
    request = core.compile_model(model, "CPU", config).create_infer_request()
    x, t, c = _inputs(size)
    inputs = [x.numpy(), t.numpy(), c.numpy()]
    request.infer(inputs)
    best, profile = float("inf"), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        request.infer(inputs)
        if time.perf_counter() - t0 < best:
            best, profile = time.perf_counter() - t0, request.get_profiling_info()
    parts = dict.fromkeys(PARTS, 0.0)
    for node in profile:
        n = node.node_name
        part = ("self-attention" if ".attn1" in n else "cross-attention" if ".attn2" in n else "feed-forward" if ".ff." in n
                else "ResBlocks" if ".resnets." in n else "transformer, other" if ".attentions." in n
                else "up/down-sampling" if "samplers" in n else "other")
        parts[part] += node.real_time.total_seconds()
    return best, parts


def _inputs(size: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, size // 8, size // 8, generator=g), torch.tensor([500.0, 500.0]),
            torch.randn(2, 77, 768, generator=g))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512,256")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    args = parser.parse_args(argv)
    if not (CACHE / "ov-diffusers-unet" / "unet.xml").exists():
        sys.exit(f"breakdown.py: no {CACHE}/ov-diffusers-unet/unet.xml; run benchmarks/speed.py once first")
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "src"))
    from plainsd.runtime import choose_dtype

    dtype = choose_dtype(args.precision)
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    print(f"Command: `.venv/bin/python benchmarks/breakdown.py --sizes {args.sizes} --precision {args.precision}`; "
          f"{precision}; {args.threads} threads; ms "
          f"per UNet step with CFG (batch 2), share of the step's parts in brackets\n")
    for size in (int(s) for s in args.sizes.split(",")):
        ours_step, ours = _plainsd_parts(size, args.repeats, dtype)
        ov_step, theirs = _openvino_parts(size, args.repeats, args.threads, precision)
        ours_sum, ov_sum = sum(ours.values()), sum(theirs.values())
        print(f"{size}x{size}: plainsd {precision} {ours_step * 1e3:.0f} ms, OpenVINO {precision} {ov_step * 1e3:.0f} ms "
              f"(its parts add up to {ov_sum * 1e3:.0f})\n")
        print(f"| part | plainsd ms | OpenVINO {precision} ms | plainsd - OpenVINO |")
        print("|---|---|---|---|")
        for p in PARTS:
            print(f"| {p} | {ours[p] * 1e3:.0f} ({ours[p] / ours_sum:.0%}) | {theirs[p] * 1e3:.0f} "
                  f"({theirs[p] / ov_sum:.0%}) | {(ours[p] - theirs[p]) * 1e3:+.0f} |")
        print()


if __name__ == "__main__":
    main()
