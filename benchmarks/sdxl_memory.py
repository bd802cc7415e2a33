"""Peak memory and time of one 1024x1024 SDXL picture on plainsd's default path, with and without the refiner.

    .venv/bin/python benchmarks/sdxl_memory.py --threads 1 --steps 2 --paths native,avx2 --cache /tmp/plainsd-sdxl

A full-size SDXL base file with random weights (fp16, as Stability publishes it: 6.9 GB) is written once into
--cache and reused. Each row runs in a fresh process: plainsd.load with the dtype runtime.choose_dtype picks for
the model on this CPU (or --precision), runtime.prepare, then txt2img at 1024x1024 with CFG, the VAE decode at
1024 (by tiles) included. The refiner row hands the latents over at refiner_switch_at 0.5 to a full-size random
refiner built in that process in fp16 and cast to the base's load dtype, as loading its file would give it (no
second 6 GB file on disk), then prepared as the pipeline prepares a refiner. The peak is the process's resident
high-water mark (VmHWM), the seconds are wall time. A few steps are enough for the peak (every step allocates
alike); the time of a 20-step picture needs a quiet machine.

--paths: "native" runs as this CPU is; "avx2" runs as a CPU with AVX2 alone would: runtime.cpu_flags reports
avx2 and fma only (so "auto" makes its choice for such a CPU) and oneDNN, MKL and ATen are held to their AVX2
kernels (ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, ATEN_CPU_CAPABILITY). Its peak is what such a CPU would
see; its seconds are this CPU's AVX2 kernels, not an AVX2 CPU's. Writes a Markdown table to --out, a row at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def peak_gb() -> float:
    """The process's peak resident memory so far, in GiB (Linux's VmHWM, kB / 2**20)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def make_random(preset: str, path: Path) -> None:
    """A random-weight model of the preset written to path in fp16, built in fp16 (a float32 SDXL would need 14
    GB before it is halved)."""
    import plainsd
    from plainsd.models import StableDiffusion

    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    sd = StableDiffusion(plainsd.preset(preset))
    torch.set_default_dtype(torch.float32)
    plainsd.save(sd, path)


def run(task: dict) -> dict:
    """One row, in this (fresh) process."""
    import plainsd
    from plainsd import pipeline, runtime, weights
    from plainsd.models import StableDiffusion

    if task["path"] == "avx2":  # (the kernels were held to AVX2 by the environment the parent gave this process)
        runtime.precision.cpu_flags = lambda: {"avx", "avx2", "fma", "f16c"}
    torch.set_num_threads(task["threads"])
    started = time.perf_counter()
    dtype = runtime.choose_dtype(task["precision"], weights.read_config(task["base"]))
    engine = runtime.prepare(plainsd.load(task["base"], dtype=dtype))
    loaded, after_load = time.perf_counter() - started, peak_gb()
    extra = {}
    if task.get("refiner"):  # a random refiner built here, as loading would make it: fp16, then the load dtype
        torch.manual_seed(0)
        torch.set_default_dtype(torch.float16)
        refiner = StableDiffusion(plainsd.preset("sdxl-refiner")).to(engine.load_dtype).eval().requires_grad_(False)
        torch.set_default_dtype(torch.float32)
        Path(task["refiner"]).touch()  # (the request checks that the refiner's path exists)
        engine.refiner = (str(Path(task["refiner"]).resolve()), runtime.prepare(refiner))
        extra = {"refiner_checkpoint": task["refiner"], "refiner_switch_at": 0.5}
    started = time.perf_counter()
    result = pipeline.txt2img(engine, "a lighthouse at dusk", "blurry", steps=task["steps"], width=1024,
                              height=1024, seed=0, sampler="Euler", **extra)
    seconds = time.perf_counter() - started
    assert result.images[0].size == (1024, 1024)
    return {"load_s": loaded, "load_peak": after_load, "seconds": seconds, "peak": peak_gb(),
            "dtype": str(dtype).replace("torch.", ""), "compute": str(engine.sd.unet.dtype).replace("torch.", "")}


AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def _child(task: dict) -> dict:
    env = {**os.environ, **(AVX2_ONLY if task.get("path") == "avx2" else {})}
    out = subprocess.run([sys.executable, __file__, "--task", json.dumps(task)], capture_output=True, text=True,
                         env=env)
    if out.returncode:
        raise SystemExit(f"the row {task} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--precision", default="auto", help="runtime.choose_dtype's setting (auto, bf16, fp16, fp32)")
    p.add_argument("--cache", default=str(ROOT / "benchmarks" / ".cache"))
    p.add_argument("--rows", default="base,refiner")
    p.add_argument("--paths", default="native", help="native, avx2 or both (module doc)")
    p.add_argument("--append", action="store_true", help="add the rows to the table already in --out")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "sdxl_memory.md"))
    p.add_argument("--task", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.task:
        task = json.loads(args.task)
        if task.get("make"):
            make_random(task["make"], Path(task["path"]))
            print("{}")
        else:
            print(json.dumps(run(task)))
        return
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    files = {"sdxl": cache / "sdxl-random-fp16.safetensors", "sdxl-refiner": cache / "sdxl-refiner-in-memory"}
    for preset, path in list(files.items())[:1]:
        if not path.is_file():
            print(f"writing {path} ...", flush=True)
            _child({"make": preset, "path": str(path)})
    from plainsd import runtime

    flags = sorted(runtime.cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    command = (f"`benchmarks/sdxl_memory.py --threads {args.threads} --steps {args.steps} --precision "
               f"{args.precision} --paths {args.paths} --rows {args.rows}`")
    header = (f"One 1024x1024 SDXL picture (random full-size weights, fp16 files), txt2img with CFG 7, Euler, "
              f"{args.steps} steps, VAE decode (by tiles) included; {os.cpu_count()} cores ({', '.join(flags)}), "
              f"{args.threads} threads, precision {args.precision}, each row a fresh process. Written by {command}.")
    table = ["| CPU path | row | weights loaded as | compute dtype | load s | peak RSS after load GiB | picture s "
             "| peak RSS GiB |", "|---|---|---|---|---|---|---|---|"]
    notes = []
    if args.append and Path(args.out).is_file():  # (paragraphs: the header, the table, notes)
        header, table, *notes = Path(args.out).read_text().rstrip("\n").split("\n\n")
        table = table.split("\n")
        notes.append(f"The rows from row {len(table) - 1} on were added by {command}.")
    for path in args.paths.split(","):
        for row in args.rows.split(","):
            task = {"base": str(files["sdxl"]), "refiner": str(files["sdxl-refiner"]) if row == "refiner" else None,
                    "threads": args.threads, "steps": args.steps, "precision": args.precision, "path": path}
            r = _child(task)
            label = "base" if row == "base" else "base + refiner (switch at 0.5)"
            cpu = "this CPU" if path == "native" else "as AVX2 only (forced)"
            table.append(f"| {cpu} | {label} | {r['dtype']} | {r['compute']} | {r['load_s']:.0f} | "
                         f"{r['load_peak']:.2f} | {r['seconds']:.0f} | {r['peak']:.2f} |")
            print(table[-1], flush=True)
            Path(args.out).write_text("\n\n".join([header, "\n".join(table), *notes]) + "\n")

if __name__ == "__main__":
    main()
