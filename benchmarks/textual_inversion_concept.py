"""Textual inversion on what it is for: one new token for a concept the shipped model can draw but has no word for.

    .venv/bin/python benchmarks/textual_inversion_concept.py             # trains, then judges (about 15 minutes)
    .venv/bin/python benchmarks/textual_inversion_concept.py --no-train  # judges the run folder's embedding again

The concept is the shipped recipe's (src/plainsd/data/recipes/finetune-textual-inversion-thing.json): renders of
one scene of the shapes world (a small orange diamond at the top on a black background) with the caption
"a sks-thing". The recipe trains through the plain CLI, `plainsd finetune textual-inversion --config
finetune-textual-inversion-thing`, timed. Then, on `--images` seeds each (20 steps of DPM++ 2M Karras, CFG 5, the
default runtime), the judge reads every attribute (shape, colour, size, position, background, one object) of:
the base model's pictures for the full caption (the ceiling: what the model draws when told in words); the bare
token without the embedding and with the embedding's starting vectors (what the words alone give); the bare
token with the trained embedding. The held-out ordinary prompts are drawn with and without the embedding
loaded, and must give the same pictures to the bit; the file is read as A1111's loader reads it. The table goes
to benchmarks/textual_inversion_concept.md and to stdout.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import plainsd
from plainsd.embeddings import Embedding, read_embedding, save_embedding
from plainsd.eval.metrics import held_out_scenes, scene_rate
from plainsd.pipeline import txt2img
from plainsd.runtime.precision import cpu_flags, cpu_name
from plainsd.train.data import Obj, Scene
from plainsd.train.finetune import initial_vectors, settings
from plainsd.train.loop import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "finetune-textual-inversion-thing"
PLAINSD = [str(Path(sys.executable).parent / "plainsd")]  # the console script beside this Python
WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
         "centre": "in the centre"}
COLUMNS = ("shape", "colour", "size", "position", "background", "count", "all")


def concept(cfg: TrainConfig) -> tuple[Scene, str]:
    """The recipe's one scene (each data choice must be a single value) and the caption that says it in words."""
    data = cfg.data
    values = {k: data[k] for k in ("shapes", "colours", "sizes", "positions", "backgrounds")}
    if any(len(v) != 1 for v in values.values()):
        raise ValueError(f"{RECIPE} must fix one shape, colour, size, position and background; got {values}")
    (shape,), (colour,), (size,), (position,), (background,) = values.values()
    words = f"a {size} {colour} {shape} {WHERE[position]} on a {background} background"
    return Scene([Obj(shape, colour, size, position)], background), words


def a1111_reads(path: Path) -> torch.Tensor:
    """The vectors A1111's loader (modules/textual_inversion/textual_inversion.py, load_from_file) takes from a
    .safetensors embedding: string_to_param's one entry, or SDXL's clip_l and clip_g, or the file's one tensor."""
    from safetensors.torch import load_file

    data = load_file(str(path), device="cpu")
    if "string_to_param" in data or ("clip_g" in data and "clip_l" in data):
        raise AssertionError(f"{path.name} is not a one-tensor SD 1 embedding: {list(data)}")
    if len(data) != 1:
        raise AssertionError(f"A1111 refuses {path.name}: 'embedding file has multiple terms in it' ({list(data)})")
    vec = next(iter(data.values()))
    return (vec[None] if vec.ndim == 1 else vec).float()


def train(run: Path, threads: int) -> float:
    """Minutes the shipped recipe takes through the plain CLI."""
    start = time.perf_counter()
    subprocess.run([*PLAINSD, "finetune", "textual-inversion", "--config", RECIPE, "--out", str(run), "--quiet",
                    "--threads", str(threads)], check=True, cwd=ROOT)
    return (time.perf_counter() - start) / 60


def identical_ordinary(sd, run: Path, n: int) -> int:
    """How many of n held-out ordinary prompts give the same picture to the bit with the embedding loaded."""
    same = 0
    for i, scene in enumerate(held_out_scenes(n, 1)):
        a = txt2img(sd, scene.caption, seed=i).images[0]
        b = txt2img(sd, scene.caption, seed=i, embeddings_dir=run).images[0]
        same += a.tobytes() == b.tobytes()
    return same


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=str(ROOT / "runs" / "proof" / "textual-inversion-thing"), help="run folder")
    p.add_argument("--images", type=int, default=100, help="seeds per row")
    p.add_argument("--ordinary", type=int, default=100, help="held-out ordinary prompts drawn with and without")
    p.add_argument("--threads", type=int, default=1, help="for the training and the judging")
    p.add_argument("--no-train", action="store_true", help="judge the embedding already in --run")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    cfg = TrainConfig.from_file(ROOT / "src" / "plainsd" / "data" / "recipes" / f"{RECIPE}.json")
    s = settings(cfg)
    scene, words = concept(cfg)
    minutes = None if args.no_train else train(run, args.threads)
    made = run / f"{s.token}.safetensors"
    sd = plainsd.load()
    bare = f"a {s.token}"
    rows = [("base model, the caption in words", words, scene_rate(sd, words, scene, args.images)),
            ("base model, the bare token (no embedding)", bare, scene_rate(sd, bare, scene, args.images))]
    with tempfile.TemporaryDirectory() as start:
        save_embedding(Embedding(s.token, initial_vectors(sd, s).detach()), Path(start) / made.name)
        rows.append((f"embedding at its start ({s.vectors} x '{s.init_word}')", bare,
                     scene_rate(sd, bare, scene, args.images, embeddings_dir=start)))
    rows.append(("trained embedding", bare, scene_rate(sd, bare, scene, args.images, embeddings_dir=run)))
    same = identical_ordinary(sd, run, args.ordinary)
    a1111 = a1111_reads(made)
    ours = read_embedding(made)
    assert torch.equal(a1111, ours.vectors) and a1111.shape[1] == sd.config.text.width
    lines = [f"| what | prompt | {' | '.join(COLUMNS)} |", "|---|---|" + "---|" * len(COLUMNS)]
    for name, prompt, r in rows:
        lines.append(f"| {name} | `{prompt}` | " + " | ".join(f"{r[c]:.2f}" for c in COLUMNS) + " |")
    took = "not retrained (--no-train)" if minutes is None else f"{minutes:.1f} min with --threads {args.threads}"
    notes = [f"- training: {ours.step} steps, {took} (the recipe through `plainsd finetune textual-inversion "
             f"--config {RECIPE}`)",
             f"- file: {made.name}, {os.path.getsize(made)} bytes; A1111's loader reads one tensor of shape "
             f"{list(a1111.shape)} (float32), the vectors plainsd reads",
             f"- ordinary prompts: {same} of {args.ordinary} held-out prompts give the same picture to the bit with "
             "the embedding loaded"]
    table = "\n".join(lines + [""] + notes)
    print(table)
    isa = ", ".join(f"{f} {'yes' if f in cpu_flags() else 'no'}" for f in ("avx512_bf16", "amx_bf16"))
    cmd = "`.venv/bin/python benchmarks/textual_inversion_concept.py" + (" --no-train`" if args.no_train else "`")
    head = ("# Textual inversion: one token for a concept the shipped model draws but has no word for\n\n"
            f"Made by {cmd} on {cpu_name()} ({isa}, {os.cpu_count()} cores, shared with other work), "
            f"{args.images} seeds per row, 20 steps of DPM++ 2M Karras, CFG 5, the default runtime. The columns are "
            "the shares of pictures in which the judge reads the concept's attribute right; count: one object "
            "only; all: every one at once.\n\n")
    (ROOT / "benchmarks" / "textual_inversion_concept.md").write_text(head + table + "\n")
    return 0 if same == args.ordinary else 1


if __name__ == "__main__":
    sys.exit(main())
