"""Make the shipped default model from a finished training: fp16 weights with their recommended settings,
and a model card written from the run folders and `plainsd eval`'s JSON.

    python -m plainsd.train.ship --runs runs --eval runs/eval.json

writes src/plainsd/data/plainsd-base.safetensors and src/plainsd/data/plainsd-base.md.

    python -m plainsd.train.ship --runs runs --eval runs/eval.json --vae-from OLD.safetensors

ships the VAE of an earlier shipped model instead of the runs' (when only the text encoder and the UNet were
retrained on its latents): the VAE's weights come from that file and its training rows from the card beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..weights import DEFAULT_MODEL, load, save
from .loop import atomic_write

# What the plain command uses: the settings the evaluation measured.
# Guidance for the first 60% of the steps only: on this model, guidance in the last, low-noise steps rounds
# off a small diamond's corners (judged a circle) the harder the stronger it is.
# A request that leaves the sampler out (or asks for LCM) gets the with_lora set where the LCM-LoRA is shipped beside
# the model (pipeline.model_recommendations): its 4 steps, which its card measures against the 20.
RECOMMENDED = {"steps": 20, "sampler": "DPM++ 2M", "schedule": "karras", "cfg_scale": 5.0, "guidance_until": 0.6,
               "width": 64, "height": 64,
               "with_lora": {"lora": "plainsd-base.lcm-lora", "steps": 4, "sampler": "LCM", "schedule": "automatic",
                             "cfg_scale": 1.0, "guidance_until": 1.0}}


# The runs the shipped model is made of, in order; the ones after vae and clip only if they ran. The -objects runs
# go on from the run before them with the objects' pixels weighted in the loss (extra.object_weight).
NETS = ("vae", "vae-decoder", "vae-decoder-objects", "clip", "unet", "unet-objects")
OPTIONAL = ("vae-decoder", "vae-decoder-objects", "unet-objects")


def run_facts(runs: Path, net: str) -> dict:
    """Steps, seconds and recipe of one training run (seconds from its checkpoint, or its logs)."""
    folder = runs / net
    facts: dict = {"recipe": json.loads((folder / "config.json").read_text())}
    meta = json.loads(safe_open(str(folder / "checkpoint.safetensors"), "pt").metadata()["plainsd.train"])
    facts["steps"] = meta["step"]
    # The checkpoint counts its run's time across resumes, but a run resumed from a checkpoint written before
    # checkpoints carried their time counts only the later segments; the CLI's closing lines in the logs
    # (one per segment) count them all. The larger of the two is the run's time.
    network = facts["recipe"]["network"]
    others = [n for n in NETS if n != net and n.startswith(net)]  # unet-objects.log is not the unet run's
    logs = [log for log in sorted(runs.glob(f"{net}*.log")) if not any(log.name.startswith(o) for o in others)]
    lines = [m for log in logs
             for m in re.findall(rf"trained {network} to step (\d+) in (\d+) s", log.read_text(errors="ignore"))]
    counts = [s for s in (meta.get("seconds"), sum(int(s) for _, s in lines) if lines else None) if s is not None]
    facts["seconds"] = max(counts) if counts else None
    facts["final_loss"] = sum(meta["losses"][-50:]) / len(meta["losses"][-50:])
    return facts


VAE_NETS = ("vae", "vae-decoder", "vae-decoder-objects")


def carried_vae_facts(card_text: str) -> dict:
    """The VAE runs' rows of an earlier model card, kept as they are (steps and time read back from them)."""
    facts = {}
    shapes = "all" if "saw them too" in card_text else None  # the card's sentence on the VAE's data
    for line in card_text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in VAE_NETS and cells[1].isdigit():
            minutes = re.fullmatch(r"([\d.]+) min", cells[3])
            facts[cells[0]] = {"row": line.strip(), "steps": int(cells[1]), "recipe": {"data": {"shapes": shapes}},
                               "seconds": float(minutes.group(1)) * 60 if minutes else None}
    if "vae" not in facts:
        raise ValueError("that model card has no training row for the vae run to carry over")
    return facts


def card(facts: dict, metrics: dict, size_bytes: int, params: int) -> str:
    """The model card: what the model is, how each run trained it, and what the evaluation measured."""
    nets = [n for n in NETS if n in facts]
    lines = _card_summary(facts, size_bytes, params) + _card_training(facts, nets) + _card_evaluation(metrics)
    return "\n".join(lines)


def _card_summary(facts: dict, size_bytes: int, params: int) -> list[str]:
    """The card's title, what the model is and was trained on, its file and its recommended settings."""
    vae_saw_all = facts["vae"]["recipe"].get("data", {}).get("shapes") == "all"
    few = RECOMMENDED["with_lora"]
    return [
        "# plainsd-base: the model plainsd ships",
        "",
        "A small Stable Diffusion (SD 1.x classes and checkpoint layout: CLIP text encoder, latent UNet, "
        "AutoencoderKL with 4 latent channels and factor 8) trained from scratch on a CPU by plainsd's own "
        "recipes, on the shapes world of `plainsd.train.data`: 5 shapes (circle, square, triangle, diamond, "
        "cross), 8 colours, 2 sizes, 5 positions, 8 backgrounds, one or two objects, captions in varied phrasing "
        "that sometimes leave attributes out. The heart and the star are kept out of the data of CLIP and the UNet (the "
        "fine-tuning recipes teach the heart). " + ("The VAE, a codec for any picture as SD's is, saw them too "
        "(its recipe's data: shapes 'all')." if vae_saw_all else "They are kept out of the VAE's data too."),
        "",
        f"- Weights: `plainsd-base.safetensors`, {params / 1e6:.1f} M parameters, float16, {size_bytes / 2**20:.1f} MB, "
        "original SD key layout (A1111, ComfyUI and diffusers' single-file loader read it).",
        f"- Images: {RECOMMENDED['width']}x{RECOMMENDED['height']} pixels (latents 8x8x4).",
        f"- Recommended (the plain `plainsd txt2img` uses these): {few['steps']} steps of the {few['sampler']} "
        f"sampler at CFG {few['cfg_scale']:g} with the LCM-LoRA shipped beside the model ([{few['lora']}]"
        f"({few['lora']}.md), its `<lora:{few['lora']}:1>` added to the prompt); with any other sampler, "
        f"{RECOMMENDED['steps']} steps of {RECOMMENDED['sampler']} with the {RECOMMENDED['schedule']} schedule, CFG "
        f"{RECOMMENDED['cfg_scale']:g} for the first {RECOMMENDED['guidance_until']:.0%} of the steps "
        "(`--guidance-until`; the conditional prediction alone after that: late guidance rounds off the corners of "
        "small shapes). The evaluation below is of the 20-step settings.",
        "",
    ]


def _card_training(facts: dict, nets: list[str]) -> list[str]:
    """The card's table of training runs (steps, batch, time, precision, recipe) and what the runs add up to."""
    def minutes(net):
        s = facts[net]["seconds"]
        return f"{s / 60:.1f} min" if s else "not recorded"

    lines = [f"## Training ({os.cpu_count()}-core CPU)", "",  # the machine shipping is the one that trained (make model)
             "| network | steps | batch | time | precision | recipe |", "|---|---|---|---|---|---|"]
    for net in nets:
        if "row" in facts[net]:  # carried over from an earlier card
            lines.append(facts[net]["row"])
            continue
        r = facts[net]["recipe"]
        lines.append(f"| {net} | {facts[net]['steps']} | {r['batch_size']} | {minutes(net)} | "
                     f"{'bf16 autocast' if r.get('bf16') else 'float32'} | lr {r['lr']:g} "
                     f"{r['lr_schedule']}, {json.dumps(r.get('extra', {}))} |")
    total = sum(facts[n]["seconds"] or 0 for n in nets)
    return lines + [
        "",
        f"Total training time: {total / 60:.0f} min, the sum of the {len(nets)} runs (`make model` runs them one "
        "after the other on all cores). " + ("The vae-decoder run fine-tunes the VAE's decoder on its frozen encoder's "
        "latents after the VAE training (the shipped VAE has its encoder and that decoder; the UNet's latent space is "
        "the encoder's, unchanged). " if "vae-decoder" in nets else "") + ("The -objects runs go on from the run "
        "before them with the objects' pixels weighted more in the loss (the recipes' object_weight): a small shape "
        "covers 2% of the picture, and a plain per-pixel loss let the decoder and the UNet round off a small "
        "diamond's corners. " if any(n.endswith("-objects") for n in nets) else "") + facts.get("note", ""),
        "",
    ]


def _card_evaluation(metrics: dict) -> list[str]:
    """The card's table of what `plainsd eval --checks` measured, and the settings it measured them with."""
    so, two = metrics.get("single_object", {}), metrics.get("two_objects", {})
    lines = ["## Evaluation (`plainsd eval --checks`, held-out prompts and seeds)", "", "| measure | value |", "|---|---|"]
    rows = [("VAE reconstruction PSNR (dB)", metrics.get("vae_psnr_db")),
            ("CLIP text -> image top-1 retrieval among 100", metrics.get("clip_top1_retrieval")),
            ("single object: colour and shape", so.get("colour_and_shape")),
            ("single object: position", so.get("position")),
            ("single object: size", so.get("size")),
            ("two objects: colour and shape (both)", two.get("colour_and_shape")),
            ("two objects: position", two.get("position")),
            ("FID on CLIP image features (vs renders)", so.get("fid_clip")),
            ("CLIP score", so.get("clip_score")),
            ("colour and shape at CFG 1 / 2 / 3 / 5", " / ".join(f"{v:.2f}" for v in metrics.get("cfg_sweep_colour_and_shape", {}).values()) or None),
            ("'a circle': red objects without / with negative prompt 'red'",
             f"{metrics['negative_prompt']['red_without']:.2f} / {metrics['negative_prompt']['red_with']:.2f}" if "negative_prompt" in metrics else None),
            ("img2img at strength 0.3 keeps shape, colour and position", metrics.get("img2img_0.3_keeps"))]
    for name, value in rows:
        if value is not None:
            lines.append(f"| {name} | {value if isinstance(value, str) else round(value, 3)} |")
    return lines + ["", f"Settings: {json.dumps(metrics.get('settings', {}))}.", ""]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs")
    p.add_argument("--eval", default="runs/eval.json")
    p.add_argument("--note", default="", help="anything about this run the card should say")
    p.add_argument("--out", default=str(DEFAULT_MODEL))
    p.add_argument("--vae-from", help="an earlier shipped model whose VAE (and card rows for it) to keep")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    carried = {}
    if args.vae_from:
        old_card = Path(args.vae_from).with_suffix(".md")
        if not old_card.is_file():
            raise SystemExit(f"--vae-from needs the model's card beside it ({old_card}) to carry its VAE's training rows")
        carried = carried_vae_facts(old_card.read_text())
    facts: dict = {}
    for net in NETS:
        if carried and net in VAE_NETS:
            if net in carried:
                facts[net] = carried[net]
        elif net not in OPTIONAL or (runs / net).is_dir():
            facts[net] = run_facts(runs, net)
    facts["note"] = args.note
    metrics = json.loads(Path(args.eval).read_text())
    sd = load(runs / ("unet-objects" if "unet-objects" in facts else "unet") / "model.safetensors")
    decoder = next((n for n in ("vae-decoder-objects", "vae-decoder") if n in facts), None)
    if args.vae_from:  # encoder and decoder as shipped before (the UNet trained on that encoder's latents)
        sd.vae.load_state_dict(load(args.vae_from).vae.state_dict())
    elif decoder:  # the fine-tuned decoder (the encoder, and so the latents, are the VAE run's)
        from .recipes import load_vae

        sd.vae.load_state_dict(load_vae(runs / decoder / "vae.safetensors")[0].state_dict())
    sd.defaults = dict(RECOMMENDED)
    out = save(sd, args.out, dtype=torch.float16)
    params = sum(p.numel() for p in sd.parameters())
    text = card(facts, metrics, out.stat().st_size, params)
    atomic_write(out.with_suffix(".md"), text)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB) and {out.with_suffix('.md')}")
    tiny = runs / "taesd" / "taesd.safetensors"
    if tiny.is_file():  # fast mode's decoder, found by plainsd.load next to the model
        target = atomic_write(out.with_suffix(".taesd.safetensors"), tiny.read_bytes())
        print(f"wrote {target} ({target.stat().st_size / 2**20:.2f} MB)")


if __name__ == "__main__":
    main()
