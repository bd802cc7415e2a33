"""Bulk generation: pictures per minute of `plainsd batch` on this machine with its cores used three ways: one
process with 2 threads, 2 worker processes with 1 thread each, and Ray (a local instance) with 2 one-CPU actors.

    .venv/bin/python benchmarks/batch_speed.py                  # the table in benchmarks/batch_speed.md
    .venv/bin/python benchmarks/batch_speed.py --small-requests 4 --big-model /tmp/tiny.safetensors \\
        --big-size 64 --big-steps 1 --big-requests 2 --out /tmp/bs.md   # checks that every row runs

Two models: the shipped one (64x64, 20 steps of DPM++ 2M Karras, CFG 7, the size it was trained at) and speed.py's
random SD1.5 checkpoint (written once into benchmarks/.cache; 512x512, few steps of the same sampler so that a row
takes minutes: the UNet's share of a picture is smaller than at 20 steps, the VAE decoder's larger). Each batch is
a JSON-lines file of distinct prompts and seeds, drawn by plainsd.batch.run_batch into an empty folder in a fresh
process per row and round, in plainsd's default precision (bf16 where the CPU has it natively). A row's figures:
the wall time of the whole batch (model loads, worker start-up, Ray's start included), pictures per minute over
that time, and pictures per minute once every worker has delivered its first picture (the rate a long batch
approaches). Every row draws the same pictures; only a different thread count can change their last bits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import ROOT, _checkpoint, cpu_name  # noqa: E402

ROWS = {
    "1 process x 2 threads": {"workers": 1, "threads": 2},
    "2 processes x 1 thread": {"workers": 2, "threads": 1},
    "Ray (local), 2 actors x 1 CPU": {"workers": 2, "threads": 1, "ray": "local"},
}
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "cyan")
SHAPES = ("circle", "square", "triangle", "star")


def _requests(path: Path, n: int, size: int, steps: int) -> Path:
    lines = [{"prompt": f"a {COLOURS[i % len(COLOURS)]} {SHAPES[i // len(COLOURS) % len(SHAPES)]}", "seed": i,
              "steps": steps, "width": size, "height": size, "sampler_name": "DPM++ 2M", "scheduler": "karras",
              "cfg_scale": 7} for i in range(n)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def worker(task: dict) -> dict:
    """One row's batch in this process: wall time, and the time each request's pictures were written."""
    sys.path.insert(0, str(ROOT / "src"))
    from plainsd.batch import run_batch

    with tempfile.TemporaryDirectory() as folder:
        requests = _requests(Path(folder) / "requests.jsonl", task["requests"], task["size"], task["steps"])
        written = []
        started = time.perf_counter()
        summary = run_batch(requests, Path(folder) / "out", model=task["model"], progress=False,
                            on_drawn=lambda entry: written.append(time.perf_counter() - started), **task["row"])
        seconds = time.perf_counter() - started
    if summary.failed or summary.drawn != task["requests"]:
        raise SystemExit(f"the batch drew {summary.drawn} of {task['requests']}: {summary.failed[:1]}")
    return {"seconds": seconds, "written": written}


def _run(task: dict) -> dict:
    """The task in a fresh process (`batch_speed.py --worker`): its result, or {"error": its last line}."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        # (PYTHONPATH: Ray's worker processes import this checkout's plainsd too)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(task), "--result", out.name],
                              capture_output=True, text=True, env=env)
        if proc.returncode:
            return {"error": (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]}
        return json.loads(Path(out.name).read_text())


def _figures(results: list[dict], workers: int) -> dict:
    """Medians over the rounds: seconds, pictures per minute overall and once every worker has drawn one."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return {"error": results[0]["error"]}
    n = len(ok[0]["written"])

    def steady(r):
        first = r["written"][min(workers, n) - 1]
        return 60 * (n - min(workers, n)) / (r["written"][-1] - first) if n > workers else float("nan")

    return {"seconds": statistics.median(r["seconds"] for r in ok),
            "overall": statistics.median(60 * n / r["seconds"] for r in ok),
            "steady": statistics.median(steady(r) for r in ok)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--small-requests", type=int, default=48, help="requests for the shipped model (64x64)")
    p.add_argument("--small-steps", type=int, default=20)
    p.add_argument("--big-model", default=None, help="default: speed.py's random SD1.5 checkpoint")
    p.add_argument("--big-size", type=int, default=512)
    p.add_argument("--big-steps", type=int, default=4)
    p.add_argument("--big-requests", type=int, default=8)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "batch_speed.md"))
    args = p.parse_args()
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(json.loads(args.worker))))
        return
    sys.path.insert(0, str(ROOT / "src"))
    from plainsd.weights import DEFAULT_MODEL

    models = [(f"shipped model, {args.small_requests} pictures 64x64, {args.small_steps} steps", str(DEFAULT_MODEL),
               args.small_requests, 64, args.small_steps),
              (f"SD1.5-size random weights, {args.big_requests} pictures {args.big_size}x{args.big_size}, "
               f"{args.big_steps} steps", args.big_model or str(_checkpoint()), args.big_requests, args.big_size,
               args.big_steps)]
    table = [f"CPU: {cpu_name()}, {_cores()} cores; `{' '.join(['benchmarks/batch_speed.py', *sys.argv[1:]])}`", "",
             "| batch | workers | wall s | pictures/min | pictures/min after start-up |", "|---|---|---|---|---|"]
    for label, model, n, size, steps in models:
        for name, row in ROWS.items():
            results = []
            for _ in range(args.rounds):
                results.append(_run({"model": model, "requests": n, "size": size, "steps": steps, "row": row}))
            f = _figures(results, row["workers"])
            line = (f"| {label} | {name} | error: {f['error']} | | |" if "error" in f else
                    f"| {label} | {name} | {f['seconds']:.1f} | {f['overall']:.1f} | {f['steady']:.1f} |")
            print(line, flush=True)
            table.append(line)
    Path(args.out).write_text("\n".join(table) + "\n")
    print(f"wrote {args.out}")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    main()
