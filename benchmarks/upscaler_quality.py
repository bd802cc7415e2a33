"""plainsd-x4 (the shipped model's own x4 upscaler) against Lanczos and the latent hires fix, 64x64 -> 256x256.

1. Held-out scenes (metrics.held_out_scenes: seeds no training recipe uses; the upscaler trained on data seed 31),
   one object each, every attribute stated. Each is drawn at 64x64, taken through the shipped VAE (encode, the
   posterior's mean, decode, 8 bits: the picture the scene's own latents give) and upscaled x4; the truth is the
   scene drawn at 256x256. PSNR (mean of the pictures') and the judge's reading at 256x256, against the judge's
   reading of the 64x64 picture itself.
2. The shipped model's own pictures: txt2img at 64x64 for the held-out captions (seed i for caption i, the
   model's recommended settings), upscaled by plainsd-x4 and by Lanczos, and the same prompt and seed drawn with
   the hires fix (A1111's default "Latent" upscaler, x4 to 256x256, its default denoising strength 0.7). No truth
   exists for these: the judge only. The latent hires fix redraws a picture from a prompt, so it has no place in
   part 1.

    .venv/bin/python benchmarks/upscaler_quality.py --threads 1        # 200 scenes, 50 prompts; writes the .md
    .venv/bin/python benchmarks/upscaler_quality.py --scenes 20 --prompts 10 --out /tmp/x.md --picture ''

--picture (default docs/upscaler.png) also draws four held-out scenes in rows: the 64x64 picture (enlarged by
nearest neighbour), Lanczos, plainsd-x4 and the 256x256 render.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import plainsd
from plainsd.eval import upscaling
from plainsd.eval.metrics import held_out_scenes
from plainsd.images import contact_sheet, to_pil, to_tensor
from plainsd.pipeline import txt2img
from plainsd.runtime import cpu_name
from plainsd.request import HiresFix
from plainsd.train.recipes import load_vae
from plainsd.train.upscaler import to_bytes
from plainsd.weights import DEFAULT_MODEL, load_upscaler

UPSCALER = Path(plainsd.__file__).parent / "data" / "plainsd-x4.safetensors"
SETTINGS = dict(steps=20, sampler="DPM++ 2M", schedule="karras", cfg_scale=5.0)  # the model's recommended


def held_out_table(net, vae, n: int, picture: str) -> dict:
    scenes, small, large = upscaling.held_out_pairs(vae, n)
    table = upscaling.compare({"Lanczos": upscaling.lanczos, "plainsd-x4": upscaling.network(net)}, scenes, small, large)
    table = {("64x64 (VAE round trip)" if k == "64x64" else k): v for k, v in table.items()}
    if picture:
        k = min(4, n)
        rows = [torch.nn.functional.interpolate(small[:k], scale_factor=4, mode="nearest"),
                upscaling.lanczos(small[:k]), upscaling.network(net)(small[:k]), large[:k]]
        contact_sheet(to_pil(torch.cat(rows).float() / 127.5 - 1), columns=k).save(picture)
    return table


def generated_table(net, n: int) -> tuple[dict, float]:
    """The judge on the model's 64x64 pictures, their two upscales, and the latent hires fix at 256; and the seconds
    the hires fix took per picture."""
    sd = plainsd.load()
    scenes = held_out_scenes(n, 1)
    small, hires, seconds = [], [], 0.0
    for i, scene in enumerate(scenes):
        small.append(to_bytes(to_tensor(txt2img(sd, scene.caption, seed=i, **SETTINGS).images[0])))
        started = time.perf_counter()
        picture = txt2img(sd, scene.caption, seed=i, hires=HiresFix(scale=4.0, upscaler="Latent"), **SETTINGS).images[0]
        seconds += time.perf_counter() - started
        hires.append(to_bytes(to_tensor(picture)))
    small = torch.cat(small)
    started = time.perf_counter()
    ours = upscaling.network(net)(small)
    ours_seconds = (time.perf_counter() - started) / n
    table = {"64x64": upscaling.adherence_of(small, scenes),
             "Lanczos": upscaling.adherence_of(upscaling.lanczos(small), scenes),
             "plainsd-x4": upscaling.adherence_of(ours, scenes),
             "hires fix, Latent, strength 0.7": upscaling.adherence_of(torch.cat(hires), scenes)}
    return table, seconds / n, ours_seconds



def markdown(part1: dict, part2: dict, hires_seconds: float, ours_seconds: float, args, meta: dict) -> str:
    cols = ("colour_and_shape", "position", "size", "all")
    lines = ["# plainsd-x4 against Lanczos and the latent hires fix, 64x64 -> 256x256",
             "", f"`benchmarks/upscaler_quality.py --scenes {args.scenes} --prompts {args.prompts}` on {cpu_name()}, "
             f"{os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}. Upscaler: "
             f"{Path(args.upscaler).name} (recipe data seed {meta.get('plainsd.data_seed', '?')}, {meta.get('plainsd.steps', '?')} steps).",
             "", f"## 1. Held-out scenes through the shipped VAE ({args.scenes}; truth: the 256x256 render)", "",
             "| picture | PSNR at 256 (dB) | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, row in part1.items():
        lines.append(f"| {name} | {row.get('psnr_db', '-')} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
    if not part2:
        return "\n".join(lines + [""])
    lines += ["", f"## 2. The shipped model's own pictures ({args.prompts} held-out prompts; the judge only)", "",
              "| picture | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, row in part2.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
    lines += ["", f"Seconds per picture: plainsd-x4 {ours_seconds:.4f} (the upscale alone), hires fix "
              f"{hires_seconds:.2f} (the whole txt2img with its second pass).", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--upscaler", default=str(UPSCALER))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "upscaler_quality.md"))
    parser.add_argument("--picture", default=str(Path(__file__).parent.parent / "docs" / "upscaler.png"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from safetensors import safe_open

    meta = safe_open(args.upscaler, framework="pt").metadata() or {}
    net = load_upscaler(args.upscaler)
    vae, _ = load_vae(DEFAULT_MODEL)
    with torch.no_grad():
        part1 = held_out_table(net, vae.float(), args.scenes, args.picture)
        print(json.dumps(part1, indent=1))
        part2, hires_seconds, ours_seconds = generated_table(net, args.prompts) if args.prompts else ({}, 0.0, 0.0)
    text = markdown(part1, part2, hires_seconds, ours_seconds, args, meta)
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
