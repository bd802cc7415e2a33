"""CPU speed and memory of SDXL: plainsd's default path side by side with diffusers and OpenVINO.

    .venv/bin/python benchmarks/sdxl_speed.py --e2e          # the table in benchmarks/sdxl_speed.md (see README.md)
    .venv/bin/python benchmarks/sdxl_speed.py --preset tiny-sdxl --sizes 256 --repeats 1 --sd15-size 64 --e2e \
        --check --out /tmp/xl.md                             # checks that every part runs (figures mean nothing)

A UNet step with CFG (batch 2) at each of --sizes, on random SDXL-size weights (speed does not depend on the
values) written once into benchmarks/.cache as an fp16 file in the original layout, which every engine reads:
plainsd with plainsd.load and runtime.prepare (its default path, in the precision it picks for this CPU),
diffusers' UNet2DConditionModel through diffusers' own single-file converter (float32, and bf16 where the CPU
has it natively), OpenVINO by converting that diffusers UNet with openvino.convert_model (as optimum-intel does;
bf16 inference where the CPU has it, `openvino-f32` on request). Each measurement runs in a fresh process, one
after the other (never two full UNets in memory at once), so that start-up and peak RSS are its own; OpenVINO's
conversion and compilation happen once beforehand in processes of their own, and the timed process imports the
compiled model mapped from disk. The same engines' SD1.5 step (benchmarks/speed.py's workers and checkpoint) at
--sd15-size gives the ratios the SDXL ones are held to. --e2e adds one txt2img picture (20 steps of DPM++ 2M,
CFG 7) with plainsd's default path, without and with the refiner (A1111's switch at 0.8; one UNet in memory at a
time, as A1111's default sd_checkpoints_limit of 1 keeps it), each process drawing an untimed 1-step picture first;
--e2e-rows picks one of the two. --check compares one step of every engine with plainsd's float32 one on the
same weights (use it with a tiny preset). --avx2-only runs every process as a CPU with AVX2 alone would
(speed.hold_to_avx2: the kernels of torch, MKL and OpenVINO held to AVX2, plainsd choosing as there: fp16 weights
computed in float32 for SDXL, float32 for SD1.5), on this CPU's clock, caches and memory: a stand-in for that
class, which the table names.

Needs the test extras (diffusers, transformers) and openvino: pip install -e '.[test,openvino]'.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import (CACHE, PROMPT, ROOT, cpu_name, direct_convolutions, flags_shown, hold_to_avx2, _peaks,  # noqa: E402
                   _rss_gib, matmul_peak)
from speed import _checkpoint as sd15_checkpoint  # noqa: E402
from speed import _run as speed_run  # noqa: E402

# name -> (runtime, precision); "auto": plainsd's default for this CPU, "best": bf16 where the CPU has it natively
ENGINES = {
    "plainsd": ("plainsd", "auto"),
    "plainsd-fp32": ("plainsd", "fp32"),
    "plainsd-direct": ("plainsd-direct", "auto"),  # plainsd's default without Winograd's convolutions
    "diffusers-fp32": ("diffusers", "fp32"),
    "diffusers-bf16": ("diffusers", "bf16"),
    "openvino": ("openvino", "best"),
    "openvino-f32": ("openvino", "fp32"),
}
DEFAULT_ENGINES = "plainsd,diffusers-fp32,diffusers-bf16,openvino"
CHECK_TOLERANCE = {"fp32": 1e-4, "bf16": 1e-1}  # max |a - b| / max |reference|, against plainsd in float32


def _precision(engine: str, bf16: bool) -> str:
    """The precision an engine runs in on this CPU: fp32 or bf16."""
    wanted = ENGINES[engine][1]
    if wanted in ("auto", "best"):
        return "bf16" if bf16 else "fp32"
    return wanted


# --- the worker: one task in a fresh process -----------------------------------------------------------

def _write_weights(task: dict) -> dict:
    """A random model of the preset as one fp16 file in the original layout. Made in fp16 from the start, so a
    full SDXL needs 7 GB here, not 14. Tiny presets get every weight perturbed (as the parity tests do), so that
    --check cannot pass through a zero-initialised layer."""
    import torch

    import plainsd
    from plainsd.config import preset
    from plainsd.models import StableDiffusion

    torch.manual_seed(task.get("seed", 0))
    tiny = task["preset"].startswith("tiny")
    torch.set_default_dtype(torch.float32 if tiny else torch.float16)
    sd = StableDiffusion(preset(task["preset"])).eval().requires_grad_(False)
    if tiny:
        from tests.reference import perturb

        perturb(sd, task.get("seed", 0) + 1)
    plainsd.save(sd, task["path"], dtype=torch.float16)
    return {"peak_rss_gib": _rss_gib()}


def _inputs(unet_cfg, size: int):
    """x, t, context, pooled text and the base model's size numbers of one step with CFG (batch 2)."""
    import torch

    from plainsd.models.sdxl import SIZE_EMBED_DIM, size_numbers

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size // 8, size // 8, generator=g)
    context = torch.randn(2, 77, unet_cfg.context_dim, generator=g)
    pooled = torch.randn(2, unet_cfg.adm_in_channels - 6 * SIZE_EMBED_DIM, generator=g)
    numbers = torch.tensor([size_numbers("base", size, size)] * 2)
    return x, torch.tensor([500.0, 500.0]), context, pooled, numbers


def _diffusers_unet(path: str, unet_cfg, dtype):
    """diffusers' UNet of the file: its UNet keys alone read, converted by diffusers, cast tensor by tensor."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from safetensors import safe_open

    from tests.reference import diffusers_unet_kwargs

    with safe_open(path, "pt") as f:
        ckpt = {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.diffusion_model.")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_unet_kwargs(unet_cfg))
    state = convert_ldm_unet_checkpoint(ckpt, dict(unet.config))
    del ckpt
    for k in list(state):  # one tensor at a time: never the fp16 file and the fp32 UNet whole side by side
        state[k] = state.pop(k).to(dtype)
    unet.load_state_dict(state, strict=True, assign=True)
    return unet.eval()


def _plainsd_step(task: dict, dtype):
    import plainsd
    from plainsd import runtime
    from plainsd.models.sdxl import vector

    if task["runtime"] == "plainsd-direct":
        direct_convolutions()
    engine = runtime.prepare(plainsd.load(task["path"], dtype=dtype))
    dtype = engine.sd.unet.dtype  # (fp16-stored weights compute in float32)
    return lambda x, t, c, pooled, numbers: engine.unet(x.to(dtype), t, c.to(dtype),
                                                        y=vector(pooled, numbers).to(dtype)).float()


def _diffusers_step(task: dict, dtype):
    from plainsd.config import preset

    unet = _diffusers_unet(task["path"], preset(task["preset"]).unet, dtype)

    def step(x, t, c, pooled, numbers):
        added = {"text_embeds": pooled.to(dtype), "time_ids": numbers}
        return unet(x.to(dtype), t, encoder_hidden_states=c.to(dtype), added_cond_kwargs=added, return_dict=False)[0].float()
    return step


def _ov_xml(task: dict) -> Path:
    """The converted model, one per weights file."""
    return CACHE / f"ov-{Path(task['path']).stem}" / "unet.xml"


def _ov_config(task: dict) -> dict:
    return {"INFERENCE_PRECISION_HINT": "bf16" if task["precision"] == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": task["threads"]}


def _ov_compiled(task: dict):
    """The converted model compiled for the task's size, precision and threads. OpenVINO keeps the compiled model in
    its CACHE_DIR, written to the file as it goes (export_model's bytes would hold a second copy of SDXL's weights in
    memory), and reads it from there in later processes; one cache per precision, as speed.py keeps them."""
    import openvino as ov

    from plainsd.config import preset

    core = ov.Core()
    core.set_property({"CACHE_DIR": str(_ov_xml(task).parent / f"compiled-{task['precision']}")})
    model = core.read_model(str(_ov_xml(task)))
    model.reshape({i: list(s.shape) for i, s in enumerate(_inputs(preset(task["preset"]).unet, task["size"]))})
    return core.compile_model(model, "CPU", _ov_config(task))


def _ov_compile(task: dict) -> dict:
    """Convert diffusers' UNet once (float32 IR) and compile it for one size and precision (_ov_compiled)."""
    import openvino as ov
    import torch

    from plainsd.config import preset

    xml = _ov_xml(task)
    started = time.perf_counter()
    if not xml.is_file():
        unet_cfg = preset(task["preset"]).unet
        unet = _diffusers_unet(task["path"], unet_cfg, torch.float32)

        class Wrapped(torch.nn.Module):
            def __init__(self, u):
                super().__init__()
                self.u = u

            def forward(self, x, t, c, text_embeds, time_ids):
                return self.u(x, t, c, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                              return_dict=False)[0]

        with torch.no_grad():
            model = ov.convert_model(Wrapped(unet), example_input=_inputs(unet_cfg, 256))
        del unet
        xml.parent.mkdir(parents=True, exist_ok=True)
        tmp = xml.with_name("tmp-unet.xml")
        ov.save_model(model, str(tmp), compress_to_fp16=False)  # (speed.py: fp16-compressed weights ran slower in bf16)
        del model
        tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
        tmp.replace(xml)
    _ov_compiled(task)
    return {"seconds": time.perf_counter() - started, "peak_rss_gib": _rss_gib()}


def _openvino_step(task: dict, dtype):
    import torch

    compiled = _ov_compiled(task)  # (read from OpenVINO's cache: _ov_compile made it)
    request = compiled.create_infer_request()

    def step(x, t, c, pooled, numbers):
        out = request.infer([a.float().numpy() for a in (x, t, c, pooled, numbers)])[0]
        return torch.from_numpy(out.copy())
    step.compiled = compiled  # (kept as long as the step)
    return step


def _unet_step(task: dict) -> dict:
    """Load one engine, call it once untimed (packs weights / picks kernels: start-up), then time --repeats steps."""
    import torch

    from plainsd import runtime, weights
    from plainsd.config import preset

    dtype = torch.bfloat16 if task["precision"] == "bf16" else torch.float32
    if task.get("default"):  # plainsd's choice for this CPU and this model
        dtype = runtime.choose_dtype("auto", weights.read_config(task["path"]))
    started = time.perf_counter()
    load = {"plainsd": _plainsd_step, "plainsd-direct": _plainsd_step, "diffusers": _diffusers_step,
            "openvino": _openvino_step}[task["runtime"]]
    step = load(task, dtype)
    inputs = _inputs(preset(task["preset"]).unet, task["size"])
    with torch.inference_mode():
        out = step(*inputs)
        result = {"startup": time.perf_counter() - started}
        times = []
        for _ in range(task["repeats"]):
            t0 = time.perf_counter()
            step(*inputs)
            times.append(time.perf_counter() - t0)
        result.update(seconds=statistics.median(times), peak_rss_gib=_rss_gib())
        if task.get("save"):
            from safetensors.torch import save_file

            from plainsd.models.sdxl import size_numbers

            saved = {"out": out.contiguous()}
            if task["runtime"] == "plainsd" and task["precision"] == "fp32":  # what a wrong vector would give
                x, t, c, pooled, _ = inputs
                other = torch.tensor([size_numbers("base", 2 * task["size"], task["size"])] * 2)
                saved["wrong_sizes"] = step(x, t, c, pooled, other).contiguous()
            save_file(saved, task["save"])
    return result


def _e2e(task: dict) -> dict:
    """One txt2img picture with plainsd's default path (and the refiner, where the task names one), after an
    untimed 1-step picture of the same size."""
    import torch

    import plainsd
    from plainsd import pipeline, runtime, weights

    started = time.perf_counter()
    dtype = runtime.choose_dtype("auto", weights.read_config(task["path"]))
    engine = runtime.prepare(plainsd.load(task["path"], dtype=dtype))
    refiner = {"refiner_checkpoint": task["refiner"], "refiner_switch_at": 0.8} if task.get("refiner") else {}
    settings = dict(sampler="DPM++ 2M", cfg_scale=7, seed=1, width=task["size"], height=task["size"], **refiner)
    with torch.inference_mode():
        pipeline.txt2img(engine, PROMPT, steps=1, **settings)
        result = {"startup": time.perf_counter() - started}
        t0 = time.perf_counter()
        pipeline.txt2img(engine, PROMPT, steps=20, **settings)
    return {**result, "seconds": time.perf_counter() - t0, "peak_rss_gib": _rss_gib()}


def worker(task: dict) -> dict:
    import torch

    if task.get("avx2_only"):
        hold_to_avx2()
    torch.set_num_threads(task["threads"])
    torch.set_flush_denormal(True)  # for every engine, as speed.py does
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT))
    return {"write": _write_weights, "ov-compile": _ov_compile, "unet": _unet_step, "e2e": _e2e}[task["kind"]](task)


def _run(task: dict) -> dict:
    return speed_run(task, __file__)


# --- the driver ---------------------------------------------------------------------------------------

def _weights(name: str, threads: int) -> Path:
    """The random model's file in benchmarks/.cache, written once in a process of its own."""
    path = CACHE / f"{name}-random.safetensors"
    if not path.is_file():
        print(f"writing a random {name} checkpoint (fp16, once) ...", flush=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        r = _run({"kind": "write", "preset": name, "path": str(path), "threads": threads,
                  "seed": 1 if "refiner" in name else 0})
        if "error" in r:
            raise SystemExit(f"could not write {path.name}: {r['error']}")
    return path


def unet_gflop(preset_name: str, size: int) -> float:
    """GFLOP of one UNet step with CFG (batch 2), counted by torch's FlopCounterMode on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from plainsd.config import preset
    from plainsd.models.sdxl import vector
    from plainsd.models.unet import UNetModel

    cfg = preset(preset_name).unet
    if cfg.adm_in_channels:  # SDXL
        x, t, c, pooled, numbers = _inputs(cfg, size)
        y = vector(pooled, numbers).to("meta")
    else:
        x, t, c, y = torch.randn(2, 4, size // 8, size // 8), torch.ones(2), torch.randn(2, 77, cfg.context_dim), None
    with torch.device("meta"):
        unet = UNetModel(cfg)
        with FlopCounterMode(display=False) as counter:
            unet(x.to("meta"), t.to("meta"), c.to("meta"), y=y)
    return counter.get_total_flops() / 1e9


def _shown(r: dict) -> str:
    if "error" in r:
        return "failed: " + r["error"]
    extra = f", start-up {r['startup']:.1f} s" if "startup" in r else ""
    return f"{r['seconds']:.2f} s ({'peak RSS %.2f GiB' % r['peak_rss_gib']}{extra})"


def _measure(args, path: Path, bf16: bool) -> dict:
    """Every engine at every size, --rounds times, each in a fresh process; OpenVINO compiled beforehand."""
    common = {"preset": args.preset, "path": str(path), "threads": args.threads, "repeats": args.repeats,
              "avx2_only": args.avx2_only}
    results: dict[tuple, list[dict]] = {}
    for engine in args.engines:
        if ENGINES[engine][0] == "openvino":
            for size in args.sizes:
                r = _run({**common, "kind": "ov-compile", "runtime": "openvino", "size": size,
                          "precision": _precision(engine, bf16)})
                results[("ov-compile", size, engine)] = [r]
                print(f"OpenVINO conversion and compilation, {engine} at {size}: {_shown(r)}", flush=True)
    for r in range(args.rounds):
        for size in args.sizes:
            for engine in args.engines:
                res = _run({**common, "kind": "unet", "runtime": ENGINES[engine][0], "size": size,
                            "precision": _precision(engine, bf16), "default": engine in ("plainsd", "plainsd-direct")})
                results.setdefault(("unet", size, engine), []).append(res)
                print(f"round {r + 1}: SDXL UNet step {size} {engine}: {_shown(res)}", flush=True)
    return results


def _measure_sd15(args, bf16: bool) -> dict:
    """The same engines' SD1.5 UNet step with CFG at --sd15-size (speed.py's worker and checkpoint)."""
    common = {"checkpoint": str(sd15_checkpoint()), "threads": args.threads, "repeats": args.repeats, "kind": "unet",
              "size": args.sd15_size, "fast": False, "token_merging": 0.0}
    results: dict[tuple, list[dict]] = {}
    for engine in args.engines:
        if ENGINES[engine][0] == "openvino":  # its IR and compiled blob once, as speed.py warms them
            speed_run({**common, "runtime": "openvino", "precision": _precision(engine, bf16), "repeats": 1})
    for r in range(args.rounds):
        for engine in args.engines:
            res = speed_run({**common, "runtime": ENGINES[engine][0], "precision": _precision(engine, bf16)})
            results.setdefault(("sd15", args.sd15_size, engine), []).append(res)
            print(f"round {r + 1}: SD1.5 UNet step {args.sd15_size} {engine}: {_shown(res)}", flush=True)
    return results


def _measure_e2e(args, path: Path) -> dict:
    refiner = _weights(args.preset + "-refiner", args.threads) if "refiner" in args.e2e_rows else None
    results: dict[tuple, list[dict]] = {}
    for r in range(args.rounds):
        for name, row, extra in (("base", "base", {}), ("refiner", "base + refiner", {"refiner": str(refiner)})):
            if name not in args.e2e_rows:
                continue
            res = _run({"kind": "e2e", "preset": args.preset, "path": str(path), "threads": args.threads,
                        "size": args.e2e_size, "avx2_only": args.avx2_only, **extra})
            results.setdefault(("e2e", args.e2e_size, row), []).append(res)
            print(f"round {r + 1}: txt2img {args.e2e_size} {row}: {_shown(res)}", flush=True)
    return results


def check(args, path: Path, bf16: bool) -> list[str]:
    """One step of every engine on the same weights and inputs against plainsd's float32 step: the relative
    difference (max |a - b| / max |reference|) within CHECK_TOLERANCE of the engine's precision. The reference run
    also gives the step with the vector of another picture size, which must fall outside even bf16's tolerance
    (the check can fail). Returns the report's lines; raises SystemExit if an engine is off."""
    from safetensors.torch import load_file

    size = args.sizes[0]
    common = {"kind": "unet", "preset": args.preset, "path": str(path), "threads": args.threads, "repeats": 1,
              "size": size}
    engines = ["plainsd-fp32"] + [e for e in args.engines if e != "plainsd-fp32"]
    outputs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in engines:
            if ENGINES[engine][0] == "openvino":
                _run({**common, "kind": "ov-compile", "runtime": "openvino", "precision": _precision(engine, bf16)})
            save = str(Path(tmp) / f"{engine}.safetensors")
            r = _run({**common, "runtime": ENGINES[engine][0], "precision": _precision(engine, bf16), "save": save})
            if "error" in r:
                raise SystemExit(f"--check: {engine} failed: {r['error']}")
            outputs[engine] = load_file(save)
    ref = outputs["plainsd-fp32"]["out"]
    scale = float(ref.abs().max())
    lines = [f"One UNet step of {args.preset} at {size}x{size} against plainsd float32 (max |difference| / max |reference|, "
             f"reference max {scale:.3g}):", "", "| engine | precision | relative difference | tolerance | ok |",
             "|---|---|---|---|---|"]
    bad = []
    rows = [(e, _precision(e, bf16), outputs[e]["out"]) for e in engines[1:]]
    rows.append(("plainsd-fp32, another size in the vector (must fail)", "bf16", outputs["plainsd-fp32"]["wrong_sizes"]))
    for name, precision, out in rows:
        d = float((out - ref).abs().max()) / scale
        ok = d <= CHECK_TOLERANCE[precision]
        if ok == name.endswith("(must fail)"):
            bad.append(name)
        lines.append(f"| {name} | {precision} | {d:.2e} | {CHECK_TOLERANCE[precision]:.0e} | {'yes' if ok else 'no'} |")
    print("\n".join(lines), flush=True)
    if bad:
        raise SystemExit(f"--check failed for {', '.join(bad)}")
    return lines + [""]


def _median(rs: list[dict], key: str) -> float | None:
    values = [r[key] for r in rs if key in r]
    return statistics.median(values) if values else None


def _step_table(title: str, results: dict, kind: str, size: int, args, gflop: float, peak: float) -> list[str]:
    base = _median(results.get((kind, size, "diffusers-fp32"), []), "seconds")
    lines = [f"{title}: {gflop:.0f} GFLOP", "",
             f"| engine | s/step | vs diffusers fp32 | % of {args.peak_name} matmul peak | start-up s | peak RSS GiB |",
             "|---|---|---|---|---|---|"]
    for engine in args.engines:
        rs = results.get((kind, size, engine), [])
        s = _median(rs, "seconds")
        default = kind == "unet" and engine in ("plainsd", "plainsd-direct")
        name = f"{engine} ({args.sdxl_default if default else args.precisions[engine]})"
        if s is None:
            lines.append(f"| {name} | failed: {rs[0].get('error', '') if rs else 'not run'} | | | | |")
            continue
        ratio = f"{base / s:.2f}x" if base else ""
        lines.append(f"| {name} | {s:.2f} | {ratio} | {100 * gflop / s / peak:.0f}% | {_median(rs, 'startup'):.1f} | "
                     f"{_median(rs, 'peak_rss_gib'):.2f} |")
    return lines + [""]


def _targets(results: dict, args) -> list[str]:
    """plainsd's speed-up over each peer at every SDXL size against the same speed-up on SD1.5's step."""
    def ratio(kind, size, peer):
        mine, theirs = (_median(results.get((kind, size, e), []), "seconds") for e in ("plainsd", peer))
        return theirs / mine if mine and theirs else None

    lines = [f"plainsd's speed-up over each engine, SDXL against SD1.5 at {args.sd15_size}x{args.sd15_size} "
             "(the issue's target: at least the SD1.5 figure)", "", "| engine | " +
             " | ".join(f"SDXL {s}" for s in args.sizes) + " | SD1.5 | met |", "|---|" + "---|" * (len(args.sizes) + 2)]
    for peer in (e for e in args.engines if e not in ("plainsd", "plainsd-direct")):  # (not a peer)
        sd15 = ratio("sd15", args.sd15_size, peer)
        xl = [ratio("unet", s, peer) for s in args.sizes]
        met = "" if sd15 is None or None in xl else ("yes" if min(xl) >= sd15 else "no")
        cells = " | ".join(f"{r:.2f}x" if r else "-" for r in xl)
        lines.append(f"| {peer} | {cells} | {f'{sd15:.2f}x' if sd15 else '-'} | {met} |")
    return lines + [""]


def _table(results: dict, peaks: dict, args, check_lines: list[str]) -> str:
    import diffusers
    import openvino
    import torch

    shown = flags_shown("every process" if args.avx2_only else None)
    peak = peaks[args.peak_name]
    lines = [f"Machine: {cpu_name()} (this CPU's flags: {shown}), {os.cpu_count()} cores, {args.threads} threads, "
             f"torch {torch.__version__}, diffusers {diffusers.__version__}, "
             f"OpenVINO {openvino.__version__.split('-')[0]}; measured matmul peak "
             f"{_peaks(peaks)}. Median of {args.rounds} rounds of {args.repeats} steps; command: "
             f"`.venv/bin/python benchmarks/sdxl_speed.py {shlex.join(args.argv)}`", ""]
    lines += check_lines
    for size in args.sizes:
        lines += _step_table(f"{args.preset} UNet step with CFG (batch 2) at {size}x{size}", results, "unet", size, args,
                             unet_gflop(args.preset, size), peak)
    compiled = [(k, rs[0]) for k, rs in results.items() if k[0] == "ov-compile"]
    if compiled:
        lines += ["OpenVINO's compilation (and conversion, where no converted model was on disk yet), once per size, "
                  "in processes of their own: " + "; ".join(f"{e} at {s}: {_shown(r)}" for (_, s, e), r in compiled), ""]
    if args.sd15_size:
        lines += _step_table(f"SD1.5 UNet step with CFG (batch 2) at {args.sd15_size}x{args.sd15_size} (speed.py's "
                             "workers)", results, "sd15", args.sd15_size, args, unet_gflop("sd15", args.sd15_size), peak)
        lines += _targets(results, args)
    rows = [(k[2], rs) for k, rs in results.items() if k[0] == "e2e"]
    if rows:
        lines += [f"txt2img {args.e2e_size}x{args.e2e_size} with plainsd's default path ({args.sdxl_default}), "
                  "20 steps of DPM++ 2M, CFG 7, one picture after an untimed 1-step one (text encoders + sampling + "
                  "decode; the refiner takes over at 0.8, A1111's default, with one UNet in memory at a time)", "",
                  "| picture | s | start-up s (load, 1-step picture) | peak RSS GiB |", "|---|---|---|---|"]
        for row, rs in rows:
            s = _median(rs, "seconds")
            lines.append(f"| {row} | {s:.1f} | {_median(rs, 'startup'):.1f} | {_median(rs, 'peak_rss_gib'):.2f} |" if s
                         else f"| {row} | failed: {rs[0].get('error', '')} | | |")
        lines.append("")
    return "\n".join(lines)


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="sdxl", help="the SDXL preset whose size the random weights have (sdxl; "
                   "tiny-sdxl to check that the script runs)")
    p.add_argument("--sizes", default="1024,768", help="comma-separated picture sides in pixels, multiples of 64")
    p.add_argument("--engines", default=DEFAULT_ENGINES, help=f"comma-separated, of: {', '.join(ENGINES)}")
    p.add_argument("--repeats", type=int, default=2, help="timed UNet steps per process (the median counts)")
    p.add_argument("--rounds", type=int, default=1, help="fresh processes per engine and size (the median counts)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--sd15-size", type=int, default=512, help="the SD1.5 step's picture side (0: leave it out)")
    p.add_argument("--e2e", action="store_true", help="also txt2img end to end, without and with the refiner")
    p.add_argument("--e2e-size", type=int, default=1024)
    p.add_argument("--e2e-rows", default="base,refiner", help="comma-separated end-to-end rows: base, refiner")
    p.add_argument("--check", action="store_true", help="first compare one step of every engine with plainsd's float32 "
                   "one (a tiny preset is enough)")
    p.add_argument("--avx2-only", action="store_true", help="run as a CPU with AVX2 alone would (module doc)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "sdxl_speed.md"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    sys.path.insert(0, str(ROOT / "src"))
    from plainsd.config import PRESETS

    try:
        args.sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes must be comma-separated whole numbers, got {args.sizes!r}")
    if any(s <= 0 or s % 64 for s in args.sizes + [args.e2e_size]) or args.sd15_size < 0 or args.sd15_size % 64:
        p.error("picture sizes must be positive multiples of 64 (--sd15-size may be 0)")
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown or not args.engines:
        p.error(f"unknown engine {unknown[0] if unknown else '(none)'!r}; engines: {', '.join(ENGINES)}")
    if args.preset not in PRESETS or not args.preset.endswith("sdxl"):
        p.error(f"--preset must be an SDXL base preset (sdxl, tiny-sdxl), got {args.preset!r}")
    args.e2e_rows = [r.strip() for r in args.e2e_rows.split(",") if r.strip()]
    if not args.e2e_rows or set(args.e2e_rows) - {"base", "refiner"}:
        p.error(f"--e2e-rows must name base, refiner or both, got {','.join(args.e2e_rows)!r}")
    if args.repeats < 1 or args.rounds < 1 or args.threads < 1:
        p.error("--repeats, --rounds and --threads must be at least 1")
    return args


def main(argv=None) -> int:
    import json

    args = _parse(argv)
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(json.loads(args.worker))))
        return 0
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.avx2_only:
        hold_to_avx2()
    from plainsd.runtime import native_bf16

    bf16 = native_bf16()
    args.precisions = {e: _precision(e, bf16) for e in ENGINES}
    # plainsd's SDXL default here (where the CPU has no native bf16, the SD1.5 step's is float32)
    args.sdxl_default = args.precisions["plainsd"] if bf16 else "fp16 weights, fp32 compute"
    args.peak_name = "bf16" if bf16 else "fp32"  # plainsd's default precision here: the table's peak
    path = _weights(args.preset, args.threads)
    check_lines = check(args, path, bf16) if args.check else []
    peaks = matmul_peak(args.threads, bf16)
    print(f"matmul peak ({args.threads} threads): {_peaks(peaks)}", flush=True)
    results = _measure(args, path, bf16)
    if args.sd15_size:
        results.update(_measure_sd15(args, bf16))
    if args.e2e:
        results.update(_measure_e2e(args, path))
    table = _table(results, peaks, args, check_lines)
    tmp = Path(args.out).with_name(f".{Path(args.out).name}.tmp")
    tmp.write_text(table)
    tmp.replace(args.out)
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
