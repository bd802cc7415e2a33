"""Peak memory and time of one 1024x1024 SDXL picture on plainsd's default path, alone, with the refiner, with
a ControlNet and with a T2I-Adapter.

    .venv/bin/python benchmarks/sdxl_memory.py --threads 1 --steps 2 --paths native,avx2 --cache /tmp/plainsd-sdxl

A full-size SDXL base file with random weights (fp16, as Stability publishes it: 6.9 GB) is written once into
--cache and reused. Each row runs in a fresh process: plainsd.load with the dtype runtime.choose_dtype picks for
the model on this CPU (or --precision), runtime.prepare, then txt2img at 1024x1024 with CFG, the VAE decode at
1024 (by tiles) included. The refiner row hands the latents over at refiner_switch_at 0.5 to a full-size random
refiner. --refiner-parts base (the default): its file, written once into --cache in fp16, holds a random UNet and
the base file's own bigG tower and VAE, as Stability's refiner file holds the base's, and the pipeline loads it as
it loads any refiner, sharing those two parts with the base (weights.load's share_with). --refiner-parts own: a
random refiner of its own bigG tower and VAE, written once into --cache in fp16 as well (the worst case: nothing
shared). Either refiner is in memory before the picture's timer starts. --checkpoints-limit 1 (A1111's default,
and plainsd's) lets the base's UNet and the refiner's take turns in memory (runtime/offloading.py: the other written
to a file under plainsd's cache, read back before it runs again), 2 keeps both, "1,2" runs a refiner row with each.
The peak is the process's resident high-water mark (VmHWM); the picture's peak is the same mark started again
when the picture starts, after the loading (of a refiner too): what each picture costs once the models are in
memory, as in a server. The controlnet row adds one ControlNet unit (Balanced, weight 1, a random 1024x1024
picture as the hint) with a random full-size SDXL ControlNet, written once into --cache in fp16 (its zero
convolutions zero, as a new one's: that changes neither time nor memory) and loaded before the timer starts, as
a server keeps it. The adapter row does the same with a random full-size SDXL T2I-Adapter (full_adapter_xl,
fp16). The seconds are wall time. A few steps are enough for the peak (every step allocates
alike); the time of a 20-step picture needs a quiet machine. --preset tiny-sdxl --size 64 runs the same code at
test size, in seconds.

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import AVX2_ONLY, hold_to_avx2  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def peak_gb() -> float:
    """The process's peak resident memory so far, in GiB (Linux's VmHWM, kB / 2**20)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def reset_peak() -> None:
    """Start VmHWM again from the present resident memory (Linux's clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


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


def make_refiner(preset: str, base: Path, path: Path) -> None:
    """A refiner file for the base preset ("<preset>-refiner") as Stability's is made: a random UNet built in fp16,
    and the base file's bigG tower (its conditioner.embedders.1., here .0.) and VAE tensors as they are."""
    import plainsd
    from plainsd.models.unet import UNetModel
    from plainsd.weights import SDXL_TEXT, UNET, VAE, read_tensors, write_safetensors

    config = plainsd.preset(preset + "-refiner")
    torch.manual_seed(1)
    torch.set_default_dtype(torch.float16)
    tensors = {UNET + k: v for k, v in UNetModel(config.unet).state_dict().items()}
    torch.set_default_dtype(torch.float32)
    source = read_tensors(base)
    for key in source.shapes:
        if key.startswith(VAE):
            tensors[key] = source.get(key)
        elif key.startswith(SDXL_TEXT + "1."):
            tensors[SDXL_TEXT + "0." + key[len(SDXL_TEXT + "1."):]] = source.get(key)
    write_safetensors(tensors, path, {"format": "pt"})


def make_controlnet(preset: str, path: Path) -> None:
    """A random-weight ControlNet for the preset's UNet, built in fp16 and written in the original layout."""
    import plainsd
    from plainsd.models.controlnet import ControlNet
    from plainsd.weights import save_controlnet

    torch.manual_seed(2)
    torch.set_default_dtype(torch.float16)
    controlnet = ControlNet(plainsd.preset(preset).unet)
    torch.set_default_dtype(torch.float32)
    save_controlnet(controlnet, path)


def make_adapter(preset: str, path: Path) -> None:
    """A random-weight SDXL T2I-Adapter for the preset's UNet (maps for its levels and its middle block), in fp16."""
    import plainsd
    from plainsd.config import AdapterConfig
    from plainsd.models.t2i_adapter import T2IAdapter
    from plainsd.weights import save_adapter

    cfg = plainsd.preset(preset).unet
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    torch.manual_seed(3)
    save_adapter(T2IAdapter(AdapterConfig(channels=tuple(channels + channels[-1:]), xl=True)), path,
                 dtype=torch.float16)


def _controlnet_unit(engine, task: dict) -> dict:
    """The controlnet (or adapter) row's unit, its network loaded into the engine as the pipeline keeps it; the
    request's fields for it."""
    import numpy as np
    from PIL import Image

    from plainsd import control
    from plainsd.request import ControlUnit

    folder = str(Path(task["controlnet"]).parent)
    picture = np.random.default_rng(0).integers(0, 256, (task["size"], task["size"], 3), dtype=np.uint8)
    unit = ControlUnit(Path(task["controlnet"]).stem, Image.fromarray(picture), module="none")
    control.load_controlnets(engine, (unit,), folder)
    return {"controlnet": (unit,), "controlnet_dir": folder}


def run(task: dict) -> dict:
    """One row, in this (fresh) process."""
    import plainsd
    from plainsd import pipeline, runtime, weights

    if task["path"] == "avx2":  # (the kernels were held to AVX2 by the environment the parent gave this process)
        hold_to_avx2()
    torch.set_num_threads(task["threads"])
    started = time.perf_counter()
    dtype = runtime.choose_dtype(task["precision"], weights.read_config(task["base"]))
    engine = runtime.prepare(plainsd.load(task["base"], dtype=dtype))
    engine.checkpoints_limit = task["checkpoints_limit"]
    loaded, after_load = time.perf_counter() - started, peak_gb()
    extra, shared = {}, False
    if task.get("refiner"):  # its file, loaded as the pipeline loads a refiner
        refiner = pipeline._refiner_engine(engine, task["refiner"]).sd
        shared = refiner.vae is engine.sd.vae and refiner.text_encoder.towers[0] is engine.sd.text_encoder.towers[1]
        extra = {"refiner_checkpoint": task["refiner"], "refiner_switch_at": 0.5}
    if task.get("controlnet"):
        extra = _controlnet_unit(engine, task)
    size = task["size"]
    before_picture = peak_gb()
    reset_peak()
    started = time.perf_counter()
    result = pipeline.txt2img(engine, "a lighthouse at dusk", "blurry", steps=task["steps"], width=size,
                              height=size, seed=0, sampler="Euler", **extra)
    seconds, picture_peak = time.perf_counter() - started, peak_gb()
    assert result.images[0].size == (size, size)
    return {"load_s": loaded, "load_peak": after_load, "seconds": seconds, "picture_peak": picture_peak,
            "peak": max(before_picture, picture_peak), "shared": shared,
            "dtype": str(dtype).replace("torch.", ""), "compute": str(engine.sd.unet.dtype).replace("torch.", "")}


def _header(args, flags: set[str], command: str) -> str:
    """The table's first paragraph: what each row draws, on what, and the command."""
    flags = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    full = args.preset == "sdxl"
    model = "SDXL picture (random full-size weights" if full else f"{args.preset} picture (random weights"
    return (f"One {args.size}x{args.size} {model}, fp16 files), txt2img with CFG 7, Euler, "
            f"{args.steps} steps, VAE decode (by tiles) included; {os.cpu_count()} cores ({', '.join(flags)}), "
            f"{args.threads} threads, precision {args.precision}, each row a fresh process. Written by {command}.")


def _label(row: str, limit: int, shared: bool) -> str:
    """A row's name in the table."""
    if row == "refiner":
        return ("base + refiner (switch at 0.5), bigG and VAE " + ("shared" if shared else "its own")
                + (", one UNet at a time" if limit == 1 else ", both UNets kept"))
    return {"base": "base", "controlnet": "base + one ControlNet unit", "adapter": "base + one T2I-Adapter unit"}[row]


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
    p.add_argument("--rows", default="base,refiner", help="base, refiner, controlnet, adapter (module doc)")
    p.add_argument("--paths", default="native", help="native, avx2 or both (module doc)")
    p.add_argument("--append", action="store_true", help="add the rows to the table already in --out")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "sdxl_memory.md"))
    p.add_argument("--refiner-parts", choices=["base", "own"], default="base",
                   help="the refiner's bigG tower and VAE: the base file's, shared (as the published refiner), or "
                        "random ones of its own (module doc)")
    p.add_argument("--checkpoints-limit", default="1",
                   help="A1111's sd_checkpoints_limit: 1 keeps one UNet in memory at a time, 2 both (Engine); "
                        "1,2: a refiner row with each, side by side")
    p.add_argument("--preset", default="sdxl", help="the base model's preset (tiny-sdxl: a check at test size)")
    p.add_argument("--size", type=int, default=1024, help="the picture's side in pixels")
    p.add_argument("--task", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.task:
        task = json.loads(args.task)
        if task.get("make_controlnet"):
            make_controlnet(task["make_controlnet"], Path(task["path"]))
            print("{}")
        elif task.get("make_adapter"):
            make_adapter(task["make_adapter"], Path(task["path"]))
            print("{}")
        elif task.get("make_refiner"):
            make_refiner(task["make_refiner"], Path(task["base"]), Path(task["path"]))
            print("{}")
        elif task.get("make"):
            make_random(task["make"], Path(task["path"]))
            print("{}")
        else:
            print(json.dumps(run(task)))
        return
    unknown = set(args.rows.split(",")) - {"base", "refiner", "controlnet", "adapter"}
    if unknown:
        p.error(f"unknown rows {', '.join(sorted(unknown))}; known: base, refiner, controlnet, adapter")
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    base = cache / f"{args.preset}-random-fp16.safetensors"
    refiner = cache / (f"{args.preset}-refiner-base-parts-fp16.safetensors" if args.refiner_parts == "base"
                       else f"{args.preset}-refiner-random-fp16.safetensors")
    if not base.is_file():
        print(f"writing {base} ...", flush=True)
        _child({"make": args.preset, "path": str(base)})
    if "refiner" in args.rows.split(",") and not refiner.is_file():
        print(f"writing {refiner} ...", flush=True)
        _child({"make_refiner": args.preset, "base": str(base), "path": str(refiner)} if args.refiner_parts == "base"
               else {"make": args.preset + "-refiner", "path": str(refiner)})
    controlnet = cache / "ControlNet" / f"{args.preset}-controlnet-random-fp16.safetensors"
    if "controlnet" in args.rows.split(",") and not controlnet.is_file():
        print(f"writing {controlnet} ...", flush=True)
        controlnet.parent.mkdir(exist_ok=True)
        _child({"make_controlnet": args.preset, "path": str(controlnet)})
    adapter = cache / "ControlNet" / f"{args.preset}-t2i-adapter-xl-random-fp16.safetensors"
    if "adapter" in args.rows.split(",") and not adapter.is_file():
        print(f"writing {adapter} ...", flush=True)
        adapter.parent.mkdir(exist_ok=True)
        _child({"make_adapter": args.preset, "path": str(adapter)})
    from plainsd import runtime

    command = (f"`benchmarks/sdxl_memory.py --threads {args.threads} --steps {args.steps} --precision "
               f"{args.precision} --paths {args.paths} --rows {args.rows} --refiner-parts {args.refiner_parts}"
               f" --checkpoints-limit {args.checkpoints_limit}"
               + (f" --preset {args.preset} --size {args.size}" if (args.preset, args.size) != ("sdxl", 1024) else "")
               + "`")
    header = _header(args, runtime.cpu_flags(), command)
    table = ["| CPU path | row | weights loaded as | compute dtype | load s | peak RSS after load GiB | picture s "
             "| picture's peak RSS GiB | peak RSS GiB |", "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    if args.append and Path(args.out).is_file():  # (paragraphs: the header, the table, notes)
        header, table, *notes = Path(args.out).read_text().rstrip("\n").split("\n\n")
        table = table.split("\n")
        if "picture's peak" not in table[0]:
            raise SystemExit(f"{args.out} has the table of an older version of this script; write a new file")
        notes.append(f"The rows from row {len(table) - 1} on were added by {command}.")
    limits = [int(n) for n in args.checkpoints_limit.split(",")]
    rows = [(row, limit) for row in args.rows.split(",") for limit in (limits if row == "refiner" else limits[:1])]
    for path in args.paths.split(","):
        for row, limit in rows:
            task = {"base": str(base), "refiner": str(refiner) if row == "refiner" else None, "preset": args.preset,
                    "controlnet": {"controlnet": str(controlnet), "adapter": str(adapter)}.get(row),
                    "refiner_parts": args.refiner_parts, "size": args.size, "threads": args.threads,
                    "steps": args.steps, "precision": args.precision, "path": path, "checkpoints_limit": limit}
            r = _child(task)
            cpu = "this CPU" if path == "native" else "as AVX2 only (forced)"
            table.append(f"| {cpu} | {_label(row, limit, r['shared'])} | {r['dtype']} | {r['compute']} | {r['load_s']:.0f} | "
                         f"{r['load_peak']:.2f} | {r['seconds']:.0f} | {r['picture_peak']:.2f} | {r['peak']:.2f} |")
            print(table[-1], flush=True)
            Path(args.out).write_text("\n\n".join([header, "\n".join(table), *notes]) + "\n")

if __name__ == "__main__":
    main()
