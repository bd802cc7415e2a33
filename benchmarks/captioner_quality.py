"""The shipped captioner (plainsd-base.captioner.safetensors) on held-out pictures of the shapes world.

1. Held-out renders (metrics.held_out_scenes: seeds no training recipe uses; the captioner trained on data seed 41):
   single objects of all seven shapes, pairs of objects, and the single objects through the shipped VAE's round
   trip (encode, the posterior's mean, decode, 8 bits). A caption is right on an attribute when it names it right
   for every object of the scene, and right on "all" when it names colour, shape, size and position of every
   object and as many objects as there are (eval/captions.py).
2. The shipped model's own pictures: txt2img for held-out captions (the base model's five shapes, seed i for
   caption i, the model's recommended settings). Here nobody knows the truth: the captions are compared with what
   the judge reads off each picture, and, on the pictures the judge finds right for their prompt, with the prompt.

    .venv/bin/python benchmarks/captioner_quality.py --threads 1     # 1000 + 500 + 500 renders, 200 prompts
    .venv/bin/python benchmarks/captioner_quality.py --scenes 50 --prompts 10 --out /tmp/x.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import plainsd
from plainsd.captioning import DEFAULT_CAPTIONER, ShapesCaptioner, read_captioner
from plainsd.eval.captions import caption_shares, caption_verdict, judged_scene
from plainsd.eval.judge import judge
from plainsd.eval.metrics import held_out_scenes
from plainsd.images import to_pil, to_tensor
from plainsd.pipeline import txt2img
from plainsd.runtime import cpu_name
from plainsd.train.data import ALL_SHAPES, render
from plainsd.train.recipes import load_vae
from plainsd.weights import DEFAULT_MODEL

SETTINGS = dict(steps=20, sampler="DPM++ 2M", schedule="karras", cfg_scale=5.0)  # the model's recommended
COLUMNS = ("colour", "shape", "size", "position", "count", "all")


def renders_table(captioner, n: int) -> tuple[dict, float]:
    """Caption shares on held-out renders (single, pairs, single through the VAE), and seconds per caption."""
    single = held_out_scenes(n, 1, shapes=ALL_SHAPES)
    pairs = held_out_scenes(n // 2, 2, shapes=ALL_SHAPES)
    vae, _ = load_vae(DEFAULT_MODEL)
    vae = vae.float()
    through = single[: n // 2]
    x = torch.cat([to_tensor(render(s)) for s in through])
    with torch.no_grad():
        trips = to_pil(torch.cat([vae.decode(vae.encode(c).mode()).clamp(-1, 1) for c in x.split(64)]))
    table, seconds, count = {}, 0.0, 0
    for name, scenes, images in (("renders, one object (7 shapes)", single, [render(s) for s in single]),
                                 ("renders, two objects", pairs, [render(s) for s in pairs]),
                                 ("renders through the shipped VAE, one object", through, trips)):
        started = time.perf_counter()
        captions = captioner.caption(images)
        seconds += time.perf_counter() - started
        count += len(images)
        table[f"{name} ({len(scenes)})"] = caption_shares(captions, scenes)
    return table, seconds / count


def generated_table(captioner, n: int) -> tuple[dict, list]:
    """Caption shares on the shipped model's pictures for n held-out prompts, against the judge and the prompt."""
    sd = plainsd.load()
    scenes = held_out_scenes(n, 1)
    images = [txt2img(sd, s.caption, seed=i, **SETTINGS).images[0] for i, s in enumerate(scenes)]
    captions = captioner.caption(images)
    judged = [judged_scene(im) for im in images]
    drawn_right = [i for i, (im, s) in enumerate(zip(images, scenes)) if all(all(v.values()) for v in judge(im, s))]
    table = {f"against the judge's reading ({n})": caption_shares(captions, judged),
             f"against the prompt, all pictures ({n})": caption_shares(captions, scenes)}
    if drawn_right:
        table[f"against the prompt, pictures the judge finds right ({len(drawn_right)})"] = caption_shares(
            [captions[i] for i in drawn_right], [scenes[i] for i in drawn_right])
    misses = [(scenes[i].caption, captions[i], judged[i]) for i in range(n)
              if not caption_verdict(captions[i], judged[i])["all"]]
    return table, misses



def _rows(table: dict) -> list[str]:
    lines = ["| pictures | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    return lines + [f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in COLUMNS) + " |" for name, row in table.items()]


def markdown(part1: dict, seconds: float, part2: dict, misses: list, meta: dict) -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    isa = ", ".join(f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags) or "no AVX-512"
    lines = ["# The shipped captioner on held-out pictures of the shapes world", "",
             f"`{' '.join(['benchmarks/captioner_quality.py', *sys.argv[1:]])}` on {cpu_name()} ({isa}), "
             f"{os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}. Captioner: "
             f"{DEFAULT_CAPTIONER.name} ({meta.get('plainsd.steps', '?')} training steps, float16 file, run in "
             "float32).",
             "", "A caption is right on an attribute when it names it right for every object of the picture; \"all\": "
             "colour, shape, size and position of every object, and as many objects as there are.", "",
             "## 1. Held-out renders (truth: the scene)", "", *_rows(part1), "",
             f"Seconds per caption: {seconds:.4f} (batches of 64)."]
    if part2:
        lines += ["", "## 2. The shipped model's own pictures (held-out prompts, txt2img 20 steps DPM++ 2M Karras, "
                  "CFG 5)", "", *_rows(part2)]
        if misses:
            lines += ["", "Pictures whose caption differs from the judge's reading (prompt / caption / judge):", ""]
            lines += [f"- {p} / {c} / " + "; ".join(f"{o.size} {o.colour} {o.shape} {o.position}" for o in j.objects)
                      for p, c, j in misses[:10]]
    return "\n".join(lines + [""])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=1000, help="single-object renders (pairs and VAE: half as many)")
    parser.add_argument("--prompts", type=int, default=200, help="held-out prompts drawn by the shipped model")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "captioner_quality.md"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from safetensors import safe_open

    meta = safe_open(str(DEFAULT_CAPTIONER), framework="pt").metadata() or {}
    captioner = ShapesCaptioner(read_captioner(DEFAULT_CAPTIONER))
    with torch.no_grad():
        part1, seconds = renders_table(captioner, args.scenes)
        print(json.dumps(part1, indent=1), flush=True)
        part2, misses = generated_table(captioner, args.prompts) if args.prompts else ({}, [])
        print(json.dumps(part2, indent=1))
    text = markdown(part1, seconds, part2, misses, meta)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
