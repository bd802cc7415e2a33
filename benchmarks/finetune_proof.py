"""The fine-tuning proof on the shipped model: each method teaches it a heart (a shape it never saw).

    .venv/bin/python benchmarks/finetune_proof.py             # about 40 minutes on 2 cores
    .venv/bin/python benchmarks/finetune_proof.py --only lora  # one method (the other rows stay)

For each method the shipped recipe (src/plainsd/data/recipes/finetune-*.json) runs through the plain CLI,
`plainsd finetune METHOD --out runs/proof/NAME`, timed; then `plainsd eval` measures how often the identifier
prompt draws a heart (50 seeds, the judge) and, for the methods that change the model's weights, adherence on
the 100 held-out ordinary prompts, beside the base model's. DreamBooth runs twice: with prior preservation (the
recipe) and without it (--num-class-images 0). A LoRA at weight 0 must give the base model's image to the bit.
The table goes to benchmarks/finetune_results.md and to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from plainsd.train.finetune import output_name

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "proof"
PLAINSD = [str(Path(sys.executable).parent / "plainsd")]  # the console script beside this Python

# name -> (method, extra finetune arguments, concept prompt, eval arguments for the concept, ordinary adherence?)
METHODS = {
    "dreambooth + prior preservation": ("dreambooth", [], "a sks heart", [], True),
    "dreambooth without prior": ("dreambooth", ["--num-class-images", "0"], "a sks heart", [], True),
    "lora": ("lora", [], "a sks heart <lora:lora:1>", ["--lora-dir"], False),
    "textual inversion": ("textual-inversion", [], "a sks-heart", ["--embeddings-dir"], False),
}


def _eval(args: list[str]) -> dict:
    out = subprocess.run([*PLAINSD, "eval", *args], check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout)


def _adherence(model: Path | None) -> dict:
    args = ["--prompts", "100", "--two-object-prompts", "0"] + (["--model", str(model)] if model else [])
    return _eval(args)["single_object"]


def _lora_at_zero_is_exact(run: Path) -> bool:
    import plainsd
    from plainsd.pipeline import txt2img

    sd = plainsd.load()
    base = txt2img(sd, "a red circle on the left", seed=3).images[0]
    zero = txt2img(sd, "a red circle on the left <lora:lora:0>", seed=3, lora_dir=run).images[0]
    return base.tobytes() == zero.tobytes()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["dreambooth", "lora", "textual-inversion"], default=None)
    args = p.parse_args()
    rows = []
    base = _adherence(None)
    rows.append(("base model (shipped)", "-", "-", "-", "-", base))
    for name, (method, extra, prompt, where, changes_model) in METHODS.items():
        if args.only and method != args.only:
            continue
        run = RUNS / name.replace(" ", "-").replace("+", "and")
        start = time.perf_counter()
        subprocess.run([*PLAINSD, "finetune", method, "--out", str(run), "--quiet", *extra], check=True, cwd=ROOT)
        minutes = (time.perf_counter() - start) / 60
        artefact = output_name(method)  # the recipes keep the default token, sks-heart
        size = os.path.getsize(run / artefact)
        concept_args = ["--prompts", "0", "--two-object-prompts", "0", "--concept-prompt", prompt,
                        "--concept-shape", "heart", "--concept-images", "50"]
        if method == "dreambooth":
            concept_args += ["--model", str(run / artefact)]
        concept_args += [*where, str(run)] if where else []
        rate = _eval(concept_args)["concept"]["rate"]
        adherence = _adherence(run / artefact) if changes_model else None
        note = ""
        if method == "lora":
            note = "weight 0 == base image: " + ("yes" if _lora_at_zero_is_exact(run) else "NO")
        shown = f"{size / 2**20:.2f} MB" if size >= 2**20 else f"{size / 2**10:.1f} KB"
        rows.append((name, f"{minutes:.1f} min", shown, f"{rate:.2f}", note, adherence))
        print(rows[-1], flush=True)
    made = {}
    for name, t, size, rate, note, adh in rows:
        a = f"{adh['colour_and_shape']:.2f} / {adh['position']:.2f} / {adh['size']:.2f}" if adh else "unchanged (model untouched)"
        made[name] = f"| {name} | {t} | {size} | {rate} | {a} | {note} |"
    results = ROOT / "benchmarks" / "finetune_results.md"
    if args.only and results.is_file():  # keep the other methods' rows of the last full run
        for line in results.read_text().splitlines():
            name = line.split("|")[1].strip() if line.startswith("| ") else ""
            if name in METHODS and name not in made:
                made[name] = line
    lines = ["| method | time | file | 'sks heart' drawn as a heart | ordinary prompts: colour and shape / position / size | note |",
             "|---|---|---|---|---|---|"]
    lines += [made[name] for name in ["base model (shipped)", *METHODS] if name in made]
    table = "\n".join(lines)
    print(table)
    results.write_text("Made by `.venv/bin/python benchmarks/finetune_proof.py` (2-core CPU)"
                       + (f"; the {args.only} rows by `--only {args.only}`" if args.only else "") + ".\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
