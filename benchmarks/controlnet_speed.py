"""One UNet step with one ControlNet, SD1.5 size: plainsd side by side with diffusers' UNet + ControlNetModel.

    .venv/bin/python benchmarks/controlnet_speed.py              # the table in benchmarks/controlnet_speed.md
    .venv/bin/python benchmarks/controlnet_speed.py --size 64 --rounds 1 --repeats 1 --out /tmp/cn.md   # a quick look

A UNet step with CFG (batch 2) at --size pixels (latent size / 8), with and without one ControlNet, on random
weights (speed does not depend on the values): speed.py's SD1.5 checkpoint and an SD1.5-size ControlNet written
once beside it, fp16, in the original layout. plainsd loads them with plainsd.load and load_controlnet and readies
them with runtime.prepare and runtime.prepare_controlnet (its default path); diffusers reads the same files
through its own single-file converters. The ControlNet runs on both halves of the batch and its residuals are
added to the UNet's, as diffusers' pipeline does outside guess mode. Each runtime and precision runs in a fresh
process that times the plain step and the step with the ControlNet in turn (median of --repeats, after one
untimed call of each); the rounds alternate the runtimes and the table gives the median over rounds. Where the
CPU has native bf16, bf16 and float32 rows; elsewhere float32 only.

Needs the test extras (diffusers): pip install -e '.[test]'.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import CACHE, ROOT, _checkpoint, cpu_name, _diffusers_parts, _peaks, _rss_gib, matmul_peak  # noqa: E402
from speed import _run as speed_run  # noqa: E402

CONTROLNET = CACHE / "sd15-controlnet-random.safetensors"
RUNTIMES = ("diffusers", "plainsd")  # the columns' order within a precision; diffusers fp32 is the reference


def _controlnet_file() -> Path:
    if not CONTROLNET.is_file():
        import torch

        sys.path.insert(0, str(ROOT / "src"))
        from plainsd.config import preset
        from plainsd.models.controlnet import ControlNet
        from plainsd.weights import save_controlnet

        print("writing a random SD1.5-size ControlNet (fp16, once) ...", flush=True)
        torch.manual_seed(1)
        CACHE.mkdir(parents=True, exist_ok=True)
        save_controlnet(ControlNet(preset("sd15").unet).eval(), CONTROLNET, dtype=torch.float16)
    return CONTROLNET


def _plainsd_steps(task: dict, dtype):
    import plainsd
    from plainsd import runtime
    from plainsd.weights import load_controlnet

    engine = runtime.prepare(plainsd.load(task["checkpoint"], dtype=dtype))
    controlnet = runtime.prepare_controlnet(load_controlnet(task["controlnet"], dtype=dtype), like=engine)

    def plain(x, t, c, hint):
        return engine.unet(x, t, c)

    def controlled(x, t, c, hint):
        return engine.unet(x, t, c, control=[r * 1.0 for r in controlnet(x, hint, t, c)])  # (the unit's weight)

    return plain, controlled


def _diffusers_steps(task: dict, dtype):
    import torch
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors.torch import load_file

    from plainsd.config import preset
    from tests.reference import diffusers_controlnet_kwargs

    unet = _diffusers_parts(Path(task["checkpoint"]), dtype)["unet"]
    with torch.device("meta"):
        controlnet = ControlNetModel(**diffusers_controlnet_kwargs(preset("sd15").unet))
    state = convert_controlnet_checkpoint(load_file(task["controlnet"]), dict(controlnet.config))
    controlnet.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    controlnet.eval()

    def plain(x, t, c, hint):
        return unet(x.to(dtype), t, c.to(dtype), return_dict=False)[0]

    def controlled(x, t, c, hint):
        x, c = x.to(dtype), c.to(dtype)
        down, mid = controlnet(x, t, c, hint.to(dtype), conditioning_scale=1.0, return_dict=False)
        return unet(x, t, c, down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False)[0]

    return plain, controlled


def worker(task: dict) -> dict:
    """Load one runtime in one precision, then time its plain and controlled steps in turn."""
    import torch

    torch.set_num_threads(task["threads"])
    torch.set_flush_denormal(True)  # for every runtime, as speed.py does
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT))
    dtype = torch.bfloat16 if task["precision"] == "bf16" else torch.float32
    started = time.perf_counter()
    steps = (_plainsd_steps if task["runtime"] == "plainsd" else _diffusers_steps)(task, dtype)
    size = task["size"]
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, size // 8, size // 8, generator=g), torch.randn(2, 77, 768, generator=g)
    hint = torch.rand(1, 3, size, size, generator=g).expand(2, -1, -1, -1)  # one control picture for both halves
    t = torch.tensor([500.0, 500.0])
    times: dict[str, list[float]] = {"plain": [], "control": []}
    with torch.inference_mode():
        for step in steps:  # the first call packs weights / picks kernels: start-up, not the step
            step(x, t, c, hint)
        result = {"startup": time.perf_counter() - started}
        for _ in range(task["repeats"]):
            for name, step in zip(times, steps):
                t0 = time.perf_counter()
                step(x, t, c, hint)
                times[name].append(time.perf_counter() - t0)
    result.update({name: statistics.median(values) for name, values in times.items()})
    result["peak_rss_gib"] = _rss_gib()
    return result


def _run(task: dict) -> dict:
    return speed_run(task, __file__)


def _median(rs: list[dict], key: str) -> float | None:
    values = [r[key] for r in rs if key in r]
    return statistics.median(values) if values else None


def _table(results: dict, precisions: list[str], peaks: dict, args) -> str:
    import diffusers
    import torch

    from plainsd.runtime import cpu_flags

    flags = cpu_flags()
    shown = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))
    base = results.get(("diffusers", "fp32"), [])
    base_plain, base_control = _median(base, "plain"), _median(base, "control")
    lines = [f"Machine: {cpu_name()} ({shown}), {os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}, "
             f"diffusers {diffusers.__version__}; measured matmul peak {_peaks(peaks)}. Median of {args.rounds} rounds of "
             f"{args.repeats} repeats; command: `.venv/bin/python benchmarks/controlnet_speed.py {shlex.join(args.argv)}`",
             "", f"UNet step with CFG (batch 2) at {args.size}x{args.size}, SD1.5 size, with and without one ControlNet "
             "(SD1.5 size, on both halves)", "",
             "| runtime | s/step | s/step + ControlNet | ControlNet's share | vs diffusers fp32 | + ControlNet vs diffusers fp32 "
             "| start-up s | peak RSS GiB |", "|---|---|---|---|---|---|---|---|"]
    for precision in precisions:
        for runtime in RUNTIMES:
            rs = results.get((runtime, precision), [])
            plain, control = _median(rs, "plain"), _median(rs, "control")
            name = f"{runtime} {precision}" + (" (default)" if runtime == "plainsd" and precision == precisions[-1] else "")
            if plain is None or control is None:
                lines.append(f"| {name} | failed: {rs[0].get('error', '') if rs else 'not run'} | | | | | | |")
                continue
            lines.append(f"| {name} | {plain:.2f} | {control:.2f} | {100 * (control / plain - 1):+.0f}% | "
                         f"{base_plain / plain if base_plain else float('nan'):.2f}x | "
                         f"{base_control / control if base_control else float('nan'):.2f}x | "
                         f"{_median(rs, 'startup'):.1f} | {_median(rs, 'peak_rss_gib'):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512, help="picture side in pixels (the latent is size / 8)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed steps of each kind per process (the median counts)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--checkpoint", default=None, help="an SD1.5-size checkpoint (default: speed.py's random one, "
                   "written once)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "controlnet_speed.md"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(json.loads(args.worker))))
        return 0
    args.argv = sys.argv[1:] if argv is None else list(argv)

    sys.path.insert(0, str(ROOT / "src"))
    from plainsd.runtime import native_bf16

    bf16 = native_bf16()
    precisions = ["fp32", "bf16"] if bf16 else ["fp32"]  # the last one is plainsd's default here
    checkpoint = Path(args.checkpoint) if args.checkpoint else _checkpoint()
    common = {"checkpoint": str(checkpoint), "controlnet": str(_controlnet_file()), "threads": args.threads,
              "size": args.size, "repeats": args.repeats}
    peaks = matmul_peak(args.threads, bf16)
    print(f"matmul peak ({args.threads} threads): {_peaks(peaks)}", flush=True)
    results: dict[tuple, list[dict]] = {}
    for r in range(args.rounds):
        for precision in precisions:
            for runtime in RUNTIMES:
                res = _run({**common, "runtime": runtime, "precision": precision})
                results.setdefault((runtime, precision), []).append(res)
                shown = (f"{res['plain']:.2f} s, with ControlNet {res['control']:.2f} s (start-up {res['startup']:.1f} s)"
                         if "plain" in res else res["error"])
                print(f"round {r + 1}: {runtime} {precision}: {shown}", flush=True)
    table = _table(results, precisions, peaks, args)
    Path(args.out).write_text(table)
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
