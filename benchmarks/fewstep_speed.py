"""Few-step generation, SD1.5 size: plainsd's 4 LCM steps against its 20-step default, diffusers' LCM pipeline
and OpenVINO.

    .venv/bin/python benchmarks/fewstep_speed.py                 # the table in benchmarks/fewstep_speed.md
    .venv/bin/python benchmarks/fewstep_speed.py --size 64 --rounds 1 --out /tmp/fs.md   # checks that every row runs

The model: speed.py's random SD1.5 checkpoint (UNet, VAE, CLIP text encoder) with a random LCM-LoRA fused in. The
LoRA is written once in kohya's layout (lora_unet_<diffusers module path>), rank 64 on the layers diffusers' LCM
distillation script adapts, read and merged by plainsd (lora.read_lora, lora.merge) and the result saved as one fp16
file in the original layout, which every runtime reads: plainsd with plainsd.load, diffusers through its own
single-file converters, OpenVINO by converting diffusers' UNet of that file (speed.py's _OVUNet). The weights are
random, so the pictures are noise; speed does not depend on the values, and a fused LoRA changes the UNet's
weights, not its shape.

End to end (text encoder, sampling, decode; one --size picture of speed.py's prompt, seed 1):
  - plainsd's default path: 20 steps of DPM++ 2M Karras with CFG 7 (speed.py's end-to-end settings);
  - plainsd, 4 steps of the LCM sampler at CFG 1 (one UNet call per step, no unconditional half): with the VAE's
    decoder, with a TAESD-size tiny decoder (as --tiny-decoder FILE gives it), and with --backend openvino (the
    UNet compiled by OpenVINO, the rest eager);
  - diffusers' StableDiffusionPipeline with LCMScheduler, 4 steps, guidance_scale 1, float32 and (where the CPU has
    native bf16) bf16, as speed.py's diffusers rows.
Each end-to-end process draws an untimed 1-step picture of the same size first, counted as start-up with the
loading: the weights are packed for the shape, oneDNN's kernels picked and OpenVINO's UNet compiled, which at 4
steps would otherwise be a large share of the time; the figure is what every picture after the first costs.
UNet alone (batch 1, the median of --repeats calls after one untimed call): plainsd's default path against
OpenVINO running diffusers' UNet of the same file, f32 and (native bf16) bf16. Every row runs in a fresh process;
the rounds alternate the rows and the table gives the median over rounds. plainsd runs in its default precision
(bf16 where the CPU has it natively, float32 elsewhere).

--avx2-only runs every row as a CPU with AVX2 alone would (speed.hold_to_avx2: the kernels of torch, MKL and
OpenVINO held to AVX2, plainsd choosing as there, so float32 and no bf16 rows): the kernels and the choices of
that CPU class on this CPU's clock, caches and memory. A stand-in for the class, not a measurement of one of its
CPUs; the table says which it is.

Needs the test extras (diffusers, transformers, openvino): pip install -e '.[test]'.
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
from speed import _run as speed_run  # noqa: E402
from speed import (CACHE, PROMPT, ROOT, _checkpoint, cpu_name, _diffusers_parts, flags_shown,  # noqa: E402
                   hold_to_avx2, _median, _OVUNet, _peaks, _rss_gib, matmul_peak)

STEPS = 4
LORA_RANK = 64
# the layers diffusers' LCM-LoRA distillation script (train_lcm_distill_lora_sd_wds.py) adapts, diffusers' names
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
DEFAULT_ROW = "plainsd default: 20 steps DPM++ 2M Karras, CFG 7"
LCM_ROW = f"plainsd: {STEPS} steps LCM, CFG 1"
TINY_ROW = f"plainsd: {STEPS} steps LCM, CFG 1, tiny decoder"
OPENVINO_ROW = f"plainsd --backend openvino: {STEPS} steps LCM, CFG 1"


def _rows(precision: str, bf16: bool) -> tuple[dict, dict]:
    """The end-to-end and UNet-only rows: name -> the worker's task fields. precision: plainsd's default here."""
    lcm = {"steps": STEPS, "sampler": "LCM", "cfg_scale": 1}
    e2e = {DEFAULT_ROW: {"runtime": "plainsd", "precision": precision, "steps": 20, "sampler": "DPM++ 2M",
                         "cfg_scale": 7},
           LCM_ROW: {"runtime": "plainsd", "precision": precision, **lcm},
           TINY_ROW: {"runtime": "plainsd", "precision": precision, "tiny": True, **lcm},
           OPENVINO_ROW: {"runtime": "plainsd-openvino", "precision": precision, **lcm},
           f"diffusers LCM pipeline fp32: {STEPS} steps, guidance 1": {"runtime": "diffusers", "precision": "fp32"}}
    if bf16:
        e2e[f"diffusers LCM pipeline bf16: {STEPS} steps, guidance 1"] = {"runtime": "diffusers", "precision": "bf16"}
    unet = {f"plainsd {precision} (default)": {"runtime": "plainsd", "precision": precision},
            "OpenVINO f32": {"runtime": "openvino", "precision": "fp32"}}
    if bf16:
        unet["OpenVINO bf16"] = {"runtime": "openvino", "precision": "bf16"}
    return e2e, unet


# --- the model: a random LCM-LoRA in kohya's layout, fused by plainsd --------------------------------------

def _random_lcm_lora(sd) -> dict:
    """A kohya LoRA file's tensors: random rank-64 pairs on LCM-LoRA's target layers, alpha = rank."""
    import torch

    from plainsd.lora import UNET_PREFIX, name_table

    ends = tuple("_" + t.replace(".", "_") for t in LCM_LORA_TARGETS)
    g = torch.Generator().manual_seed(2)
    tensors = {}
    for key, (net, path) in sorted(name_table(sd).items()):
        if net != "unet" or key == UNET_PREFIX + path.replace(".", "_") or not key.endswith(ends):
            continue  # published files name layers by their diffusers path: the original-layout aliases are skipped
        w = sd.unet.get_submodule(path).weight
        down = torch.randn(LORA_RANK, *w.shape[1:], generator=g) / w[0].numel() ** 0.5
        up = torch.randn(w.shape[0], LORA_RANK, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.01 / LORA_RANK**0.5
        tensors[f"{key}.lora_down.weight"] = down.half()
        tensors[f"{key}.lora_up.weight"] = up.half()
        tensors[f"{key}.alpha"] = torch.tensor(float(LORA_RANK)).half()
    return tensors


def _fused_checkpoint(base: Path) -> Path:
    """The base checkpoint with the random LCM-LoRA merged in (written once into the cache, fp16)."""
    fused = CACHE / f"{base.stem}-lcm-lora-fused.safetensors"
    if fused.is_file():
        return fused
    import torch

    import plainsd
    from plainsd import lora
    from plainsd.weights import write_safetensors

    CACHE.mkdir(parents=True, exist_ok=True)
    sd = plainsd.load(base)  # float32, so that the LoRA is added at full precision
    lora_file = CACHE / f"{base.stem}-lcm-lora.safetensors"
    if not lora_file.is_file():
        tensors = _random_lcm_lora(sd)
        print(f"writing a random LCM-LoRA, kohya layout, {len(tensors) // 3} layers of rank {LORA_RANK} ...",
              flush=True)
        write_safetensors(tensors, lora_file)
    print(f"fusing it into {base.name} (plainsd's lora.merge) and writing {fused.name} (fp16, once) ...", flush=True)
    lora.merge(sd, lora.read_lora(lora_file), 1.0)
    plainsd.save(sd, fused, dtype=torch.float16)
    return fused


# --- the worker: one row in a fresh process --------------------------------------------------------------

def _ov_names(checkpoint: str) -> dict:
    """Where _OVUNet keeps this checkpoint's IR and blobs (speed.py's own are for its unfused checkpoint)."""
    stem = Path(checkpoint).stem
    return {"folder": f"ov-{stem}", "blobs": f"ov-blobs-{stem}"}


def _plainsd_engine(task: dict, dtype):
    import plainsd
    from plainsd import runtime

    backend = "openvino" if task["runtime"] == "plainsd-openvino" else "eager"
    return runtime.prepare(plainsd.load(task["checkpoint"], dtype=dtype), backend, cache_dir=CACHE / "plainsd-openvino")


def _plainsd_e2e(task: dict, dtype, started: float) -> dict:
    """txt2img with the row's steps, sampler and CFG scale; the tiny decoder as --tiny-decoder FILE gives it."""
    import torch

    from plainsd import pipeline
    from plainsd.fast import choose
    from plainsd.weights import load_tiny_decoder

    engine = _plainsd_engine(task, dtype)
    if task.get("tiny"):
        engine.use_tiny_decoder(load_tiny_decoder(task["tiny_decoder"]), Path(task["tiny_decoder"]).name)
    def picture(steps: int):
        return pipeline.txt2img(engine, PROMPT, steps=steps, sampler=task["sampler"], cfg_scale=task["cfg_scale"],
                                seed=1, width=task["size"], height=task["size"],
                                fast=choose(False, bool(task.get("tiny"))))

    with torch.inference_mode():
        picture(1)  # packs, picks kernels, compiles OpenVINO's UNet for these shapes: start-up, not the picture
        result = {"startup": time.perf_counter() - started}
        t0 = time.perf_counter()
        out = picture(task["steps"])
        result["seconds"] = time.perf_counter() - t0
    result["decoder"] = "TAESD" if out.parameters.tiny_decoder else "VAE"
    return result


def _diffusers_e2e(task: dict, dtype, started: float) -> dict:
    """StableDiffusionPipeline with LCMScheduler (the LCM-LoRA card's set-up), STEPS steps, guidance_scale 1."""
    import torch
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from plainsd.models.tokenizer import Tokenizer

    parts = _diffusers_parts(Path(task["checkpoint"]), dtype, ("unet", "vae", "text"))
    # LCMScheduler.from_config of SD1.5's scheduler config, as the card does
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                             set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text"], tokenizer=None, unet=parts["unet"],
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    def picture(steps: int):
        # CLIPTokenizer needs vocabulary files from the Hub; plainsd's tokenizer gives the same ids (as in speed.py)
        states = parts["text"](Tokenizer("sd1")([PROMPT]))[0]
        pipe(prompt_embeds=states, num_inference_steps=steps, guidance_scale=1.0, height=task["size"],
             width=task["size"], generator=torch.Generator().manual_seed(1))

    with torch.inference_mode():
        picture(1)  # as plainsd's rows: the first call's set-up is start-up
        result = {"startup": time.perf_counter() - started}
        t0 = time.perf_counter()
        picture(STEPS)
        result["seconds"] = time.perf_counter() - t0
    return result


def _unet_alone(task: dict, dtype, started: float) -> dict:
    """One UNet call at batch 1 (a step at CFG 1): plainsd's default path or OpenVINO on diffusers' UNet."""
    import torch

    if task["runtime"].startswith("plainsd"):
        unet = _plainsd_engine(task, dtype).unet
    else:
        unet = _OVUNet(Path(task["checkpoint"]), task["precision"], task["threads"], **_ov_names(task["checkpoint"]))
    size = task["size"]
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1, 4, size // 8, size // 8, generator=g), torch.randn(1, 77, 768, generator=g)
    t = torch.tensor([500.0])
    times = []
    with torch.inference_mode():
        unet(x, t, c)  # compiles / picks kernels: start-up, not the step
        result = {"startup": time.perf_counter() - started}
        for _ in range(task["repeats"]):
            t0 = time.perf_counter()
            unet(x, t, c)
            times.append(time.perf_counter() - t0)
    result["seconds"] = statistics.median(times)
    return result


def worker(task: dict) -> dict:
    import torch

    if task["avx2_only"]:
        hold_to_avx2()
    torch.set_num_threads(task["threads"])
    torch.set_flush_denormal(True)  # for every runtime, as speed.py does
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT))
    dtype = torch.bfloat16 if task["precision"] == "bf16" else torch.float32
    started = time.perf_counter()
    # (each loads outside inference mode, as speed.py's worker does: OpenVINO traces plainsd's UNet, which
    # inference tensors cannot be)
    if task["kind"] == "fuse":  # in a process of its own too, so that the driver does not keep the model's memory
        return {"checkpoint": str(_fused_checkpoint(Path(task["checkpoint"])))}
    if task["kind"] == "unet":
        result = _unet_alone(task, dtype, started)
    elif task["runtime"] == "diffusers":
        result = _diffusers_e2e(task, dtype, started)
    else:
        result = _plainsd_e2e(task, dtype, started)
    result["peak_rss_gib"] = _rss_gib()
    return result


# --- the driver ------------------------------------------------------------------------------------------

def _run(task: dict) -> dict:
    return speed_run(task, __file__)


def _measure(jobs: list[tuple[str, str, dict]], rounds: int) -> dict:
    """(kind, row name, task) jobs, each in a fresh process, the rows alternating within each round."""
    results: dict[tuple, list[dict]] = {}
    for r in range(rounds):
        for kind, name, task in jobs:
            res = _run(task)
            results.setdefault((kind, name), []).append(res)
            shown = (f"{res['seconds']:.2f} s (start-up {res['startup']:.1f} s, peak RSS {res['peak_rss_gib']:.2f} GiB)"
                     if "seconds" in res else res["error"])
            print(f"round {r + 1}: {kind} {name}: {shown}", flush=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512, help="picture side in pixels (the latent is size / 8)")
    p.add_argument("--rounds", type=int, default=3, help="processes per row (the median counts)")
    p.add_argument("--repeats", type=int, default=3, help="timed UNet calls per UNet-only process (the median counts)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--checkpoint", default=None, help="an SD1.5-size base checkpoint (default: speed.py's random one, "
                   "written once); the LoRA is fused into a copy in benchmarks/.cache")
    p.add_argument("--tiny-decoder", default=None, metavar="FILE", help="a TAESD decoder file (default: the "
                   ".taesd.safetensors beside the base checkpoint, which speed.py writes beside its own)")
    p.add_argument("--avx2-only", action="store_true", help="run every row as a CPU with AVX2 alone would "
                   "(module doc)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "fewstep_speed.md"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(json.loads(args.worker))))
        return 0
    args.argv = sys.argv[1:] if argv is None else list(argv)

    if args.avx2_only:
        hold_to_avx2()
    from plainsd.runtime import native_bf16

    bf16 = native_bf16()
    args.precision = "bf16" if bf16 else "fp32"  # plainsd's default here
    base = Path(args.checkpoint) if args.checkpoint else _checkpoint()
    tiny = Path(args.tiny_decoder) if args.tiny_decoder else base.with_suffix(".taesd.safetensors")
    if not tiny.is_file():
        raise SystemExit(f"no tiny decoder file {tiny}: name a TAESD decoder with --tiny-decoder FILE")
    fused = _run({"kind": "fuse", "checkpoint": str(base), "threads": args.threads, "precision": "fp32",
                  "avx2_only": args.avx2_only})
    if "error" in fused:
        raise SystemExit(f"could not fuse the LCM-LoRA into {base}: {fused['error']}")
    checkpoint = fused["checkpoint"]
    common = {"checkpoint": str(checkpoint), "tiny_decoder": str(tiny), "threads": args.threads, "size": args.size,
              "repeats": args.repeats, "avx2_only": args.avx2_only}
    e2e, unet = _rows(args.precision, bf16)
    peaks = matmul_peak(args.threads, bf16)
    print(f"matmul peak ({args.threads} threads): {_peaks(peaks)}", flush=True)
    # Convert and compile the OpenVINO models once (kept on disk), so that the rounds time what a second run sees.
    compiled = {OPENVINO_ROW: e2e[OPENVINO_ROW], **{n: r for n, r in unet.items() if r["runtime"] == "openvino"}}
    for name, row in compiled.items():
        r = _run({**common, **row, "kind": "unet", "repeats": 1})
        print(f"  first run of {name}: start-up {r.get('startup', float('nan')):.1f} s {r.get('error', '')}",
              flush=True)
    jobs = [("e2e", name, {**common, **row, "kind": "e2e"}) for name, row in e2e.items()]
    jobs += [("unet", name, {**common, **row, "kind": "unet"}) for name, row in unet.items()]
    results = _measure(jobs, args.rounds)
    table = _table(results, e2e, unet, peaks, args)
    tmp = Path(args.out).with_name(f".{Path(args.out).name}.tmp")
    tmp.write_text(table)
    tmp.replace(args.out)
    print("\n" + table)
    return 0


def _table(results: dict, e2e: dict, unet: dict, peaks: dict, args) -> str:
    import diffusers
    import openvino
    import torch

    shown = flags_shown("every row" if args.avx2_only else None)
    size = args.size
    lines = [f"Machine: {cpu_name()} (this CPU's flags: {shown}), {os.cpu_count()} cores, {args.threads} threads, "
             f"torch {torch.__version__}, diffusers {diffusers.__version__}, OpenVINO {openvino.__version__}; "
             f"measured matmul peak {_peaks(peaks)}. Median of {args.rounds} rounds (UNet alone: of {args.repeats} "
             f"calls each); command: `.venv/bin/python benchmarks/fewstep_speed.py {shlex.join(args.argv)}`", "",
             f"Model: SD1.5-size random weights (UNet, VAE, CLIP) with a random rank-{LORA_RANK} LCM-LoRA (kohya "
             "layout) fused in by plainsd, one fp16 file every runtime reads. Random weights stand for a real "
             "LCM-LoRA model: the pictures are noise, the work is the same.", "",
             f"txt2img end to end, {size}x{size}, one image (text encoder + sampling + decode); plainsd in "
             f"{args.precision}, its default here", "",
             "| row | UNet calls | s | start-up s | peak RSS GiB |", "|---|---|---|---|---|"]
    for name in e2e:
        rs = results.get(("e2e", name), [])
        s = _median(rs, "seconds")
        lines.append(_row(name, 2 * 20 if name == DEFAULT_ROW else STEPS, s and f"{s:.2f}", rs))
    lines += ["", f"UNet alone at {size}x{size}, batch 1 (one step at CFG 1)", "",
              f"| runtime | s/step | {STEPS} steps s | start-up s | peak RSS GiB |", "|---|---|---|---|---|"]
    for name in unet:
        rs = results.get(("unet", name), [])
        s = _median(rs, "seconds")
        lines.append(_row(name, s and f"{s:.3f}", s and f"{STEPS * s:.2f}", rs))
    lines += ["", *_ratios(results, e2e, unet, args)]
    return "\n".join(lines) + "\n"


def _row(name: str, first, seconds: str | None, rs: list[dict]) -> str:
    """A table row: name, first column, seconds, start-up, peak RSS; or why it has no figures."""
    if seconds is None:
        return f"| {name} | {first or ''} | failed: {rs[0].get('error', '') if rs else 'not run'} | | |"
    return f"| {name} | {first} | {seconds} | {_median(rs, 'startup'):.1f} | {_median(rs, 'peak_rss_gib'):.2f} |"


def _ratios(results: dict, e2e: dict, unet: dict, args) -> list[str]:
    """The comparisons the few-step issue names, each with its target: how many times faster plainsd's row is
    than the other (the other's seconds over plainsd's)."""
    def e2e_s(name):
        return _median(results.get(("e2e", name), []), "seconds")

    def unet_s(name):
        return _median(results.get(("unet", name), []), "seconds")

    bf16 = args.precision == "bf16"
    diffusers_fp32, *diffusers_bf16 = [n for n in e2e if n.startswith("diffusers")]
    ours, ov = f"plainsd {args.precision} (default)", "OpenVINO bf16" if bf16 else "OpenVINO f32"
    rows = [(f"{LCM_ROW} against {DEFAULT_ROW}", e2e_s(LCM_ROW), e2e_s(DEFAULT_ROW), 4.0),
            (f"{LCM_ROW} against {diffusers_fp32}", e2e_s(LCM_ROW), e2e_s(diffusers_fp32), 2.0 if bf16 else 1.3)]
    rows += [(f"{LCM_ROW} against {n}", e2e_s(LCM_ROW), e2e_s(n), None) for n in diffusers_bf16]
    rows += [(f"UNet alone, {STEPS} steps: {ours} against {ov}", unet_s(ours), unet_s(ov), 1.0),
             (f"{LCM_ROW} against {OPENVINO_ROW}", e2e_s(LCM_ROW), e2e_s(OPENVINO_ROW), 1.0)]
    lines = ["The issue's comparisons (how many times faster plainsd's row is)", "", "| comparison | ratio | target |",
             "|---|---|---|"]
    for what, mine, other, target in rows:
        ratio = other / mine if mine and other else None
        met = "" if target is None or ratio is None else (" (met)" if ratio >= target else " (missed)")
        lines.append(f"| {what} | {f'{ratio:.2f}x' if ratio else 'not measured'} | "
                     f"{f'>= {target:g}x' if target else 'none'}{met} |")
    moonshot = "6" if bf16 else "30"
    lines += ["", f"A {args.size}x{args.size} picture in {STEPS} steps: {_seconds(e2e_s(LCM_ROW))} with the VAE's "
              f"decoder, {_seconds(e2e_s(TINY_ROW))} with the tiny decoder (the issue's moonshot at 512x512 on 2 "
              f"cores: under {moonshot} s)."]
    return lines


def _seconds(s: float | None) -> str:
    return f"{s:.2f} s" if s is not None else "not measured"


if __name__ == "__main__":
    sys.exit(main())
