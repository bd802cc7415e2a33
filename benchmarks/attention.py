"""bf16 attention at SD1.5's shapes: torch's SDPA against plainsd's oneDNN paths, side by side in one process.

    .venv/bin/python benchmarks/attention.py          # about a minute; writes benchmarks/attention-<cpu>.md

A prepared model's attention (plainsd.runtime.attention) takes SDPA where the CPU has AMX tiles and the oneDNN
paths (the fused-exp product for large score matrices, one batched product below) where it has avx512_bf16
alone; this measures both on the CPU at hand, the best of --repeats calls each, alternating, with batch 2 (CFG)
as in a UNet step.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from plainsd.runtime import attention as rt

# (queries, keys, channels, heads, what): SD1.5's attention at 512x512, and the VAE's single head
SHAPES = [
    (4096, 4096, 320, 8, "self-attention, level 1"),
    (1024, 1024, 640, 8, "self-attention, level 2"),
    (256, 256, 1280, 8, "self-attention, level 3"),
    (64, 64, 1280, 8, "self-attention, middle"),
    (4096, 77, 320, 8, "cross-attention, level 1"),
    (1024, 77, 640, 8, "cross-attention, level 2"),
    (256, 77, 1280, 8, "cross-attention, level 3"),
    (4096, 4096, 512, 1, "VAE decoder (one head of 512)"),
]


def _sdpa(q, k, v, heads):
    b, n, c = q.shape
    split = [t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, n, c)


def _onednn(q, k, v, heads):
    amx = rt._amx
    rt._amx = lambda: False  # the routing a CPU without AMX takes
    try:
        return rt.attention(q, k, v, heads)
    finally:
        rt._amx = amx


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not rt._fused_exp_available():
        raise SystemExit("this CPU or torch build has no oneDNN bf16 kernels: nothing to compare")
    amx = rt._amx()
    rows = []
    with torch.inference_mode():
        for n, m, c, heads, what in SHAPES:
            torch.manual_seed(0)
            q, k, v = torch.randn(2, n, c).bfloat16(), torch.randn(2, m, c).bfloat16(), torch.randn(2, m, c).bfloat16()
            best = {"sdpa": float("inf"), "onednn": float("inf")}
            for name, fn in (("sdpa", _sdpa), ("onednn", _onednn)):
                fn(q, k, v, heads)  # warm-up
            for _ in range(args.repeats):
                for name, fn in (("sdpa", _sdpa), ("onednn", _onednn)):
                    start = time.perf_counter()
                    fn(q, k, v, heads)
                    best[name] = min(best[name], time.perf_counter() - start)
            rows.append((what, n, m, c // heads, best["sdpa"] * 1e3, best["onednn"] * 1e3))
            print(f"{what}: SDPA {best['sdpa'] * 1e3:.1f} ms, oneDNN paths {best['onednn'] * 1e3:.1f} ms", flush=True)
    cpu = "amx" if amx else "avx512_bf16"
    lines = [f"Command: `.venv/bin/python benchmarks/attention.py`; {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}, {platform.processor() or platform.machine()}, CPU with "
             f"{'AMX' if amx else 'avx512_bf16, no AMX'}: plainsd takes {'SDPA' if amx else 'the oneDNN paths'}. "
             f"ms per call (bf16, batch 2), best of {args.repeats}.", "",
             "| attention | queries x keys, head width | SDPA ms | oneDNN paths ms | SDPA's speed-up |",
             "|---|---|---|---|---|"]
    lines += [f"| {what} | {n} x {m}, {d} | {s:.1f} | {o:.1f} | {o / s:.2f}x |" for what, n, m, d, s, o in rows]
    out = Path(args.out) if args.out else Path(__file__).with_name(f"attention-{cpu}.md")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
