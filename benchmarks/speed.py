"""CPU speed and memory of Stable Diffusion 1.5: plainsd side by side with diffusers and OpenVINO.

    .venv/bin/python benchmarks/speed.py                     # the README table (about 25 minutes on 2 cores)
    .venv/bin/python benchmarks/speed.py --sizes 256 --rounds 1 --skip e2e   # a quick look

Full-size SD1.5 networks with random weights (speed does not depend on the values), written once as an
fp16 single-file checkpoint in the original layout; every runtime loads that same file: plainsd with
plainsd.load, diffusers through its own single-file converters, OpenVINO by converting diffusers' UNet
with openvino.convert_model (as optimum-intel does). Each measurement runs in a fresh subprocess (so that
start-up and peak RSS are its own), the runtimes alternate within each round, all with the same thread
count, and the table gives the median over rounds. The rows follow the CPU: where it has native bf16, the
bf16 and float32 runtimes (table in benchmarks/results.md, or benchmarks/results-amx.md where the CPU also
has AMX tiles); elsewhere the float32 ones, plainsd's default there (benchmarks/results-fp32.md).

Needs the test extras (diffusers, transformers) and openvino: pip install -e '.[test,openvino]'.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache"

sys.path.insert(0, str(ROOT / "src"))
from plainsd.runtime.precision import cpu_name  # noqa: E402  (the CPU in every table; torch only, no model)
PROMPT = "a photograph of an astronaut riding a horse"  # every end-to-end row's (fewstep_speed.py's too)

# name -> (runtime, precision); the order is the order of the table's columns. On a CPU with native bf16
# (avx512_bf16 or AMX), where plainsd's default is bf16:
VARIANTS_BF16 = {
    "diffusers fp32": ("diffusers", "fp32"),
    "diffusers bf16": ("diffusers", "bf16"),
    "OpenVINO f32": ("openvino", "fp32"),
    "OpenVINO bf16": ("openvino", "bf16"),
    "plainsd fp32": ("plainsd", "fp32"),
    "plainsd bf16 (default)": ("plainsd", "bf16"),
    "plainsd openvino bf16 (compiled)": ("plainsd-openvino", "bf16"),
}
E2E_BF16 = {
    "diffusers bf16": ("diffusers", "bf16", False),
    "plainsd bf16 (default)": ("plainsd", "bf16", False),
    "plainsd openvino bf16 (compiled)": ("plainsd-openvino", "bf16", False),
    "plainsd --fast": ("plainsd", "bf16", True),
    # a dict: what differs from --fast's settings (plainsd.fast.FAST)
    "plainsd --fast --tiny-decoder": ("plainsd", "bf16", {"tiny_decoder": True}),
    "plainsd --fast, the whole UNet every 2nd step to the end (--fast before 2026-12-04)": (
        "plainsd", "bf16", {"deepcache_late": 0.0}),
    # earlier candidates, all with the whole UNet every 2nd step to the end
    "plainsd --fast, 1 block throughout (--fast before 2026-12-03)": (
        "plainsd", "bf16", {"deepcache_early": 0.0, "deepcache_late": 0.0}),
    "plainsd --fast, 2 blocks throughout": ("plainsd", "bf16", {"deepcache_depth": 2, "deepcache_early": 0.0,
                                                               "deepcache_late": 0.0}),
    "plainsd --fast, 2 blocks on the first 60% of the steps": ("plainsd", "bf16", {"deepcache_early": 0.6,
                                                                                  "deepcache_late": 0.0}),
    # a fourth item: the token merging ratio (--token-merging)
    "plainsd --token-merging 0.5": ("plainsd", "bf16", False, 0.5),
    "plainsd --fast --token-merging 0.5": ("plainsd", "bf16", True, 0.5),
}
# Elsewhere (AVX2 CPUs, say) plainsd's default is float32, and bf16 is emulated (diffusers in bf16 runs several
# times slower than in float32; OpenVINO falls back to f32): the float32 runtimes only.
VARIANTS_FP32 = {
    "diffusers fp32": ("diffusers", "fp32"),
    "OpenVINO f32": ("openvino", "fp32"),
    "plainsd fp32 (default)": ("plainsd", "fp32"),
    "plainsd fp32, direct convolutions (no Winograd)": ("plainsd-direct", "fp32"),
    "plainsd openvino f32 (compiled)": ("plainsd-openvino", "fp32"),
}
E2E_FP32 = {
    "diffusers fp32": ("diffusers", "fp32", False),
    "plainsd fp32 (default)": ("plainsd", "fp32", False),
    "plainsd openvino f32 (compiled)": ("plainsd-openvino", "fp32", False),
    "plainsd --fast": ("plainsd", "fp32", True),
    "plainsd --fast --tiny-decoder": ("plainsd", "fp32", {"tiny_decoder": True}),
    "plainsd --token-merging 0.5": ("plainsd", "fp32", False, 0.5),
}
VARIANTS, E2E = VARIANTS_BF16, E2E_BF16  # main() picks the pair for this CPU


# --- the worker: one measurement in a fresh process -------------------------------------------------

def _rss_gib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _diffusers_parts(checkpoint: Path, dtype, parts=("unet",)):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT))
    from plainsd.config import preset
    from tests.reference import diffusers_unet_kwargs, diffusers_vae_kwargs, hf_text_kwargs

    cfg = preset("sd15")
    ckpt = load_file(str(checkpoint))
    out = {}
    networks = {"unet": (UNet2DConditionModel, diffusers_unet_kwargs(cfg.unet), convert_ldm_unet_checkpoint),
                "vae": (AutoencoderKL, diffusers_vae_kwargs(cfg.vae), convert_ldm_vae_checkpoint)}
    for part, (cls, kwargs, convert) in networks.items():
        if part in parts:
            with torch.device("meta"):
                net = cls(**kwargs)
            net.load_state_dict({k: v.to(dtype) for k, v in convert(ckpt, dict(net.config)).items()}, assign=True)
            out[part] = net.eval()
    if "text" in parts:
        from transformers import CLIPTextConfig, CLIPTextModel

        text = CLIPTextModel(CLIPTextConfig(**hf_text_kwargs(cfg.text)))
        text.load_state_dict(convert_ldm_clip_checkpoint(ckpt), strict=False)
        out["text"] = text.to(dtype).eval()
    del ckpt
    return out


class _OVUNet:
    """diffusers' UNet converted by openvino.convert_model (the IR cached on disk, as a user of optimum would)."""

    def __init__(self, checkpoint: Path, precision: str, threads: int, folder: str = "ov-diffusers-unet",
                 blobs: str = "ov-blobs"):
        """folder, blobs: where in the cache the IR and the compiled blobs go (one pair per checkpoint)."""
        import openvino as ov
        import torch

        self.core = ov.Core()
        # one blob cache per precision: OpenVINO 2026.4 handed the bf16 run the f32 blob of the same model
        self.core.set_property({"CACHE_DIR": str(CACHE / f"{blobs}-{precision}")})
        xml = CACHE / folder / "unet.xml"
        if not xml.is_file():
            unet = _diffusers_parts(checkpoint, torch.float32)["unet"]

            class Wrapped(torch.nn.Module):
                def __init__(self, u):
                    super().__init__()
                    self.u = u

                def forward(self, x, t, c):
                    return self.u(x, t, c, return_dict=False)[0]

            example = (torch.randn(2, 4, 64, 64), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768))
            with torch.no_grad():
                model = ov.convert_model(Wrapped(unet), example_input=example)
            xml.parent.mkdir(parents=True, exist_ok=True)
            ov.save_model(model, str(xml), compress_to_fp16=False)  # fp16-compressed weights ran 2.5x slower in bf16
        self.model = self.core.read_model(str(xml))
        self.config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
                       "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        self.requests = {}

    def __call__(self, x, t, c):
        import torch

        shape = tuple(x.shape)
        if shape not in self.requests:
            m = self.model.clone()
            m.reshape({0: list(x.shape), 1: list(t.shape), 2: list(c.shape)})
            self.requests[shape] = self.core.compile_model(m, "CPU", self.config).create_infer_request()
        return torch.from_numpy(self.requests[shape].infer([x.numpy(), t.numpy(), c.numpy()])[0].copy())


def worker(task: dict) -> dict:
    import torch

    torch.set_num_threads(task["threads"])
    torch.set_flush_denormal(True)
    sys.path.insert(0, str(ROOT / "src"))
    runtime, precision, kind = task["runtime"], task["precision"], task["kind"]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    checkpoint = Path(task["checkpoint"])
    started = time.perf_counter()
    result: dict = {}
    if runtime.startswith("plainsd"):
        import plainsd
        from plainsd import pipeline, runtime as rt
        from plainsd.fast import FAST

        if runtime == "plainsd-direct":
            direct_convolutions()
        engine = rt.prepare(plainsd.load(checkpoint, dtype=dtype),
                            "openvino" if runtime == "plainsd-openvino" else "eager", cache_dir=CACHE / "plainsd-openvino")
        unet = engine.unet
        decode = lambda z: engine.sd.vae.decode(z)  # noqa: E731
    elif runtime == "diffusers":
        parts = _diffusers_parts(checkpoint, dtype, ("unet", "vae", "text") if kind == "e2e" else ("unet",) if kind == "unet" else ("vae",))
        unet = (lambda x, t, c: parts["unet"](x.to(dtype), t, c.to(dtype), return_dict=False)[0]) if "unet" in parts else None
        decode = (lambda z: parts["vae"].decode(z.to(dtype), return_dict=False)[0]) if "vae" in parts else None
    else:
        unet = _OVUNet(checkpoint, precision, task["threads"])
        decode = None
    size = task["size"]
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        if kind == "unet":
            x = torch.randn(2, 4, size // 8, size // 8, generator=g)
            t = torch.tensor([500.0, 500.0])
            c = torch.randn(2, 77, 768, generator=g)
            unet(x, t, c)  # compiles where there is something to compile
            result["startup"] = time.perf_counter() - started
            times = []
            for _ in range(task["repeats"]):
                t0 = time.perf_counter()
                unet(x, t, c)
                times.append(time.perf_counter() - t0)
            result["seconds"] = min(times)
        elif kind == "vae":
            z = torch.randn(1, 4, size // 8, size // 8, generator=g)
            decode(z)
            result["startup"] = time.perf_counter() - started
            t0 = time.perf_counter()
            decode(z)
            result["seconds"] = time.perf_counter() - t0
        else:  # e2e: txt2img, 20 steps of DPM++ 2M, CFG 7
            prompt = PROMPT
            if runtime.startswith("plainsd"):
                if engine.backend == "openvino":  # compile for txt2img's shapes first: that is start-up, not sampling
                    engine.unet(torch.randn(2, 4, size // 8, size // 8), torch.tensor([500.0, 500.0]),
                                torch.randn(2, 77, 768))
                result["startup"] = time.perf_counter() - started
                t0 = time.perf_counter()
                pipeline.txt2img(engine, prompt, steps=20, sampler="DPM++ 2M", cfg_scale=7, seed=1, width=size, height=size,
                                 fast=dataclasses.replace(FAST, **task["fast"]) if isinstance(task["fast"], dict) else task["fast"],
                                 token_merging=task.get("token_merging", 0.0))
                result["seconds"] = time.perf_counter() - t0
            else:
                from diffusers import DPMSolverMultistepScheduler
                from plainsd.models.tokenizer import Tokenizer

                result["startup"] = time.perf_counter() - started
                t0 = time.perf_counter()
                ids = Tokenizer("sd1")([prompt, ""])
                states = parts["text"](ids)[0]
                cond, uncond = states[:1], states[1:]
                sched = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                    num_train_timesteps=1000)
                sched.set_timesteps(20)
                latents = torch.randn(1, 4, size // 8, size // 8, generator=g) * sched.init_noise_sigma
                for ts in sched.timesteps:
                    both = parts["unet"](torch.cat([latents, latents]).to(dtype), ts, torch.cat([uncond, cond]),
                                         return_dict=False)[0].float()
                    eps_u, eps_c = both.chunk(2)
                    latents = sched.step(eps_u + 7 * (eps_c - eps_u), ts, latents).prev_sample
                parts["vae"].decode((latents / 0.18215).to(dtype), return_dict=False)
                result["seconds"] = time.perf_counter() - t0
    result["peak_rss_gib"] = _rss_gib()
    return result


# --- the driver ------------------------------------------------------------------------------------

def _checkpoint() -> Path:
    path = CACHE / "sd15-random.safetensors"
    if not path.is_file():
        import torch

        sys.path.insert(0, str(ROOT / "src"))
        import plainsd
        from plainsd.config import preset
        from plainsd.models import StableDiffusion

        print("writing a random SD1.5 checkpoint (fp16, once) ...", flush=True)
        torch.manual_seed(0)
        sd = StableDiffusion(preset("sd15")).eval()
        CACHE.mkdir(parents=True, exist_ok=True)
        plainsd.save(sd, path, dtype=torch.float16)
    tiny = path.with_suffix(".taesd.safetensors")  # fast mode's decoder, TAESD's size (random like the rest)
    if not tiny.is_file():
        import torch
        from safetensors.torch import save_file

        sys.path.insert(0, str(ROOT / "src"))
        from plainsd.models.taesd import TinyDecoder

        torch.manual_seed(1)
        save_file({k: v.half().contiguous() for k, v in TinyDecoder(4, 64).state_dict().items()}, str(tiny))
    return path


def _run(task: dict, script: str = __file__) -> dict:
    """The task run by `script --worker` in a fresh process: its result, or {"error": its last line}."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        proc = subprocess.run([sys.executable, script, "--worker", json.dumps(task), "--result", out.name],
                              capture_output=True, text=True)
        if proc.returncode:
            return {"error": (proc.stderr.strip().splitlines() or ["exit code %d" % proc.returncode])[-1]}
        return json.loads(Path(out.name).read_text())


# A CPU with AVX2 alone, as this one runs it: oneDNN (torch's and OpenVINO's), MKL and ATen held to their AVX2
# kernels by the environment, and plainsd's runtime.cpu_flags reporting what such a CPU has.
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
AVX2_FLAGS = {"avx", "avx2", "fma", "f16c"}


def direct_convolutions() -> None:
    """plainsd without Winograd's convolutions in this process (the "plainsd-direct" rows): no layer is wide
    enough for them (runtime/winograd.py's MIN_CHANNELS), so every convolution is the direct one."""
    from plainsd.runtime import winograd

    winograd.MIN_CHANNELS = sys.maxsize


def hold_to_avx2() -> None:
    """Run this process, and the processes it starts, as a CPU with AVX2 alone would: its kernels and plainsd's
    choices ("auto" precision among them) are that CPU's; its clock, caches and memory stay this CPU's. Call it
    before the first torch operation."""
    from plainsd.runtime import precision

    os.environ.update(AVX2_ONLY)
    precision.cpu_flags = lambda: set(AVX2_FLAGS)


def held_to_avx2() -> bool:
    """True in a process that hold_to_avx2 holds, or that such a process started."""
    return all(os.environ.get(name) == value for name, value in AVX2_ONLY.items())


def flags_shown(held: str | None = None) -> str:
    """This CPU's flags as the tables' first line names them; held (what --avx2-only held to AVX2: "every row",
    "every process") adds what that means."""
    from plainsd.runtime import cpu_flags

    flags = cpu_flags()
    shown = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))
    if held:
        shown += (f"; {held} held to AVX2 (--avx2-only: the kernels and choices of a CPU with AVX2 alone, on this "
                  "CPU's clock, caches and memory)")
    return shown


def matmul_peak(threads: int, bf16: bool = True) -> dict:
    """Measured GEMM throughput (GFLOP/s) of this machine in fp32 and (where the CPU has it natively) bf16,
    with torch (oneDNN / MKL)."""
    import torch

    torch.set_num_threads(threads)
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))[:2 if bf16 else 1]:
        a, b = torch.randn(4096, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
        a @ b
        best = min(_timed(lambda: a @ b) for _ in range(5))
        peaks[name] = 2 * 4096**3 / best / 1e9
    return peaks


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def model_gflop(size: int) -> tuple[float, float]:
    """GFLOP of one UNet step with CFG (batch 2) and of one VAE decode, counted by torch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT / "src"))
    from plainsd.config import preset
    from plainsd.models.unet import UNetModel
    from plainsd.models.vae import AutoencoderKL

    cfg = preset("sd15")
    with torch.device("meta"):
        unet, vae = UNetModel(cfg.unet), AutoencoderKL(cfg.vae)
        x, c = torch.randn(2, 4, size // 8, size // 8), torch.randn(2, 77, 768)
        with FlopCounterMode(display=False) as counter:
            unet(x, torch.ones(2), c)
        step = counter.get_total_flops() / 1e9
        with FlopCounterMode(display=False) as counter:
            vae.decode(torch.randn(1, 4, size // 8, size // 8))
        return step, counter.get_total_flops() / 1e9


def _skipped(runtime: str, skip: set[str]) -> bool:
    """--skip diffusers / openvino / plainsd drops every runtime of that name ("plainsd-openvino" is both)."""
    return bool(set(runtime.split("-")) & skip)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="timed UNet steps per process (the fastest counts)")
    p.add_argument("--sizes", default="512,256")
    p.add_argument("--skip", default="", help="comma-separated: unet, vae, e2e, openvino, diffusers")
    p.add_argument("--e2e", default="", help="semicolon-separated: only these end-to-end rows (default: all)")
    p.add_argument("--out", default=None, help="the table's file (default: benchmarks/results.md where the CPU has "
                   "native bf16, results-amx.md where it has AMX too, results-fp32.md elsewhere)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(json.loads(args.worker))))
        return 0

    global VARIANTS, E2E
    sys.path.insert(0, str(ROOT / "src"))
    from plainsd.runtime import cpu_flags, native_bf16

    bf16 = native_bf16()
    VARIANTS, E2E = (VARIANTS_BF16, E2E_BF16) if bf16 else (VARIANTS_FP32, E2E_FP32)
    table = ("results-amx.md" if "amx_bf16" in cpu_flags() else "results.md") if bf16 else "results-fp32.md"
    args.out = args.out or str(ROOT / "benchmarks" / table)
    args.peak = "bf16" if bf16 else "fp32"  # plainsd's default precision here: the table's peak
    skip = set(filter(None, args.skip.split(",")))
    sizes = [int(s) for s in args.sizes.split(",")]
    variants = {k: v for k, v in VARIANTS.items() if not _skipped(v[0], skip)}
    checkpoint = _checkpoint()
    peaks = matmul_peak(args.threads, bf16)
    print(f"matmul peak ({args.threads} threads): {_peaks(peaks)}", flush=True)
    common = {"checkpoint": str(checkpoint), "threads": args.threads, "repeats": args.repeats}

    # Warm the caches (OpenVINO IRs and compiled blobs) once, so that the rounds time second runs.
    for name, (runtime, precision) in variants.items():
        if "openvino" in runtime:
            for size in sizes:
                r = _run({**common, "runtime": runtime, "precision": precision, "kind": "unet", "size": size, "repeats": 1})
                print(f"  first run of {name} at {size}: start-up {r.get('startup', float('nan')):.1f} s {r.get('error', '')}", flush=True)

    jobs = []
    if "unet" not in skip:
        jobs += [("unet", size, name) for size in sizes for name in variants]
    if "vae" not in skip:
        jobs += [("vae", 512, name) for name, (rt, _) in variants.items() if rt in ("diffusers", "plainsd", "plainsd-direct")]
    if "e2e" not in skip:
        chosen = [n.strip() for n in args.e2e.split(";") if n.strip()]
        unknown = [n for n in chosen if n not in E2E]
        if unknown:
            raise SystemExit(f"unknown --e2e row {unknown[0]!r}; rows: {', '.join(E2E)}")
        jobs += [("e2e", 512, name) for name, v in E2E.items() if not _skipped(v[0], skip) and (not chosen or name in chosen)]
    results: dict[tuple, list[dict]] = {}
    for r in range(args.rounds):
        for kind, size, name in jobs:
            runtime, precision, fast, *merging = (E2E[name] if kind == "e2e" else (*VARIANTS[name], False))
            res = _run({**common, "runtime": runtime, "precision": precision, "kind": kind, "size": size, "fast": fast,
                        "token_merging": merging[0] if merging else 0.0})
            results.setdefault((kind, size, name), []).append(res)
            shown = f"{res['seconds']:.2f} s (start-up {res['startup']:.1f} s, peak RSS {res['peak_rss_gib']:.2f} GiB)" \
                if "seconds" in res else res["error"]
            print(f"round {r + 1}: {kind} {size} {name}: {shown}", flush=True)

    table = _table(results, peaks, sizes, args)
    Path(args.out).write_text(table)
    print("\n" + table)
    return 0


def _peaks(peaks: dict) -> str:
    missing = " (bf16 not run: held to AVX2)" if held_to_avx2() else " (no native bf16 on this CPU)"
    return ", ".join(f"{name} {value:.0f} GFLOP/s" for name, value in peaks.items()) + (
        "" if "bf16" in peaks else missing)



def _median(rs: list[dict], key: str) -> float | None:
    values = [r[key] for r in rs if key in r]
    return statistics.median(values) if values else None


def _table(results, peaks, sizes, args) -> str:
    import torch

    lines = [f"Machine: {cpu_name()}, {os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}; "
             f"measured matmul peak {_peaks(peaks)}. Median of {args.rounds} rounds; "
             f"command: `.venv/bin/python benchmarks/speed.py " + shlex.join(sys.argv[1:]) + "`", ""]
    for size in sizes:
        if not any(("unet", size, name) in results for name in VARIANTS):
            continue  # --skip unet
        step_gflop, _ = model_gflop(size)
        base = _median(results.get(("unet", size, "diffusers fp32"), []), "seconds")
        lines += [f"UNet step with CFG (batch 2) at {size}x{size}: {step_gflop:.0f} GFLOP", "",
                  f"| runtime | s/step | vs diffusers fp32 | % of {args.peak} matmul peak | start-up s | peak RSS GiB |",
                  "|---|---|---|---|---|---|"]
        for name in VARIANTS:
            rs = results.get(("unet", size, name))
            if not rs:
                continue
            s = _median(rs, "seconds")
            if s is None:
                lines.append(f"| {name} | failed: {rs[0].get('error', '')} | | | | |")
                continue
            ratio = f"{base / s:.2f}x" if base else ""
            lines.append(f"| {name} | {s:.2f} | {ratio} | {100 * step_gflop / s / peaks[args.peak]:.0f}% | "
                         f"{_median(rs, 'startup'):.1f} | {_median(rs, 'peak_rss_gib'):.2f} |")
        lines.append("")
    _, vae_gflop = model_gflop(512)
    rows = [(name, results[("vae", 512, name)]) for name in VARIANTS if ("vae", 512, name) in results]
    if rows:
        lines += [f"VAE decode at 512x512: {vae_gflop:.0f} GFLOP", "", f"| runtime | s | % of {args.peak} matmul peak |",
                  "|---|---|---|"]
        for name, rs in rows:
            s = _median(rs, "seconds")
            lines.append(f"| {name} | {s:.2f} | {100 * vae_gflop / s / peaks[args.peak]:.0f}% |" if s else f"| {name} | failed | |")
        lines.append("")
    rows = [(name, results[("e2e", 512, name)]) for name in E2E if ("e2e", 512, name) in results]
    if rows:
        lines += ["txt2img 512x512, 20 steps of DPM++ 2M, CFG 7, one image (text encoder + sampling + decode)", "",
                  "| runtime | s | start-up s | peak RSS GiB |", "|---|---|---|---|"]
        for name, rs in rows:
            s = _median(rs, "seconds")
            lines.append(f"| {name} | {s:.1f} | {_median(rs, 'startup'):.1f} | {_median(rs, 'peak_rss_gib'):.2f} |"
                         if s else f"| {name} | failed: {rs[0].get('error', '')} | | |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
