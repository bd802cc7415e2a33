"""BLIP captioning speed, blip-image-captioning-base size: plainsd's BlipCaptioner against transformers'
BlipForConditionalGeneration.generate on the same folder.

    .venv/bin/python benchmarks/blip_speed.py                      # the table in benchmarks/blip_speed.md
    .venv/bin/python benchmarks/blip_speed.py --tokens 4 --rounds 1 --out /tmp/b.md   # checks that every row runs

The model: transformers' BlipForConditionalGeneration with base's sizes (ViT-B/16 at 384x384, a 12-layer BERT
decoder with cross-attention) and random weights, saved once as a Hugging Face folder (benchmarks/.cache) with a
stand-in vocab.txt; every row loads that folder. One 512x512 picture is resized to 384x384 and captioned greedily
with min_length = max_length = --tokens, so that every row writes the same number of tokens whatever the random
weights prefer (a real BLIP caption is about 10 to 15 tokens; A1111's interrogator asks for 24 to 48). The "8
pictures per call" rows caption 8 copies of it in one call, as `plainsd caption DIR` does, their time divided
by 8. Each row
captions once untimed (start-up: oneDNN picks its kernels), then --rounds times; rows alternate and the table
gives the median. On a busy machine --threads 1 is fairer: two threads on two shared cores wait for each other.
Needs transformers (the test extra).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from speed import CACHE, cpu_name  # noqa: E402

FOLDER = CACHE / "blip-base-random"
BATCH = 8  # BlipCaptioner.batch_size: the pictures one forward pass takes


def _folder() -> Path:
    from transformers import BlipConfig, BlipForConditionalGeneration
    if not (FOLDER / "model.safetensors").is_file():
        torch.manual_seed(0)
        config = BlipConfig(text_config=dict(num_attention_heads=12), vision_config=dict(initializer_range=0.02))
        BlipForConditionalGeneration(config).save_pretrained(FOLDER)
        words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(30517)]
        (FOLDER / "vocab.txt").write_text("\n".join(words) + "\n")
    return FOLDER


def _rows(tokens: int) -> dict:
    """name -> a function captioning one picture."""
    from transformers import BlipForConditionalGeneration, BlipImageProcessor

    from plainsd.blip import BlipCaptioner
    rows = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ours = BlipCaptioner.from_folder(_folder(), dtype=dtype)
        rows[f"plainsd {name}"] = lambda im, c=ours: c.caption([im], min_length=tokens, max_length=tokens)
        rows[f"plainsd {name}, {BATCH} pictures per call"] = \
            lambda im, c=ours: c.caption([im] * BATCH, min_length=tokens, max_length=tokens)
        ref = BlipForConditionalGeneration.from_pretrained(_folder(), dtype=dtype).eval()
        processor = BlipImageProcessor()

        def run(im, ref=ref, dtype=dtype):
            with torch.no_grad():
                pixels = processor(images=[im], return_tensors="pt").pixel_values.to(dtype)
                return ref.generate(pixel_values=pixels, min_length=tokens, max_length=tokens, num_beams=1,
                                    do_sample=False)
        rows[f"transformers {name}"] = run
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20, help="caption length in tokens, start token included")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, one per core)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "blip_speed.md"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))
    rows = _rows(args.tokens)
    times: dict[str, list[float]] = {name: [] for name in rows}
    for name, caption in rows.items():
        caption(picture)  # start-up
    for _ in range(args.rounds):
        for name, caption in rows.items():
            start = time.perf_counter()
            caption(picture)
            times[name].append((time.perf_counter() - start) / (BATCH if "per call" in name else 1))
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    lines = [f"Machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; load average "
             f"{load} when the table was written. Median of {args.rounds} rounds; command: "
             f"`.venv/bin/python benchmarks/blip_speed.py{' '.join([''] + sys.argv[1:])}`",
             "",
             f"One 384x384 picture, greedy, {args.tokens} tokens (start token included), blip-image-captioning-base "
             "size, random weights.", "",
             "| row | s per caption |", "|---|---|"]
    lines += [f"| {name} | {statistics.median(t):.2f} |" for name, t in times.items()]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
