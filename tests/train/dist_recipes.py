"""Trains every recipe and fine-tuning a few steps on tiny configs, each into OUT/<name>.

    python dist_recipes.py BASES.json OUT                            (one process)
    torchrun --nproc-per-node 2 dist_recipes.py BASES.json OUT       (two, each computing half of every batch)

tests/train/test_dist.py runs it both ways and compares the weights. BASES.json names the files the recipes
start from: {"vae": ..., "clip": ..., "model": ...}. Each recipe's batch of 4 covers the paths that split a
batch: weighted losses, the VAE's posterior noise, CLIP's features gathered from every process, class images.
"""

import json
import sys

from plainsd.train import dist
from plainsd.train.finetune import finetune
from plainsd.train.loop import TrainConfig
from plainsd.train.recipes import RECIPES

TINY = {"text": {"width": 64, "layers": 2, "heads": 1, "projection_dim": 32},
        "vae": {"ch": 16, "ch_mult": [1, 1, 1, 2], "num_res_blocks": 1, "norm_groups": 8},
        "unet": {"model_channels": 32, "channel_mult": [1, 2], "attention_levels": [1], "num_heads": 2,
                 "context_dim": 64, "norm_groups": 8},
        "vision": {"width": 32, "layers": 1, "heads": 1, "projection_dim": 32}}
DATA = {"kind": "shapes", "seed": 0, "length": 8}


def runs(bases: dict) -> dict[str, tuple[str, dict]]:
    """name -> (network, extra) of each run."""
    vae, clip, model = bases["vae"], bases["clip"], bases["model"]
    return {
        "vae": ("vae", {"object_weight": 3.0}),
        "vae-decoder": ("vae-decoder", {"vae": vae, "latent_cache": 8, "object_weight": 3.0}),
        "taesd": ("taesd", {"vae": vae, "width": 16, "latent_cache": 8}),
        "clip": ("clip", {}),
        "clip-hard": ("clip", {"hard_negatives": 1.0, "group": 2}),
        "unet": ("unet", {"vae": vae, "clip": clip, "latent_cache": 8, "object_weight": 3.0, "snr_gamma": 5.0}),
        "unet-encoding": ("unet", {"vae": vae, "clip": clip}),
        "controlnet": ("controlnet", {"base": model, "latent_cache": 8, "fp16": False}),
        "lcm": ("lcm", {"base": model, "rank": 2, "latent_cache": 8}),
        "lcm-trajectory": ("lcm", {"base": model, "rank": 2, "latent_cache": 8, "objective": "trajectory",
                                   "pairs": 300, "solve_steps": 2}),  # two batches of pairs: one per process
        "lora": ("lora", {"model": model, "num_instance_images": 3, "rank": 2}),
        "textual-inversion": ("textual-inversion", {"model": model, "num_instance_images": 3,
                                                    "instance_prompt": "a sks-star", "token": "sks-star"}),
        "dreambooth": ("dreambooth", {"model": model, "num_instance_images": 3, "class_prompts": "shapes",
                                      "num_class_images": 4}),
    }


def main(bases_file: str, out: str, only: str | None = None):
    bases = json.loads(open(bases_file).read())
    with dist.group():
        for name, (network, extra) in runs(bases).items():
            if only and name not in only.split(","):
                continue
            fine = network in ("lora", "textual-inversion", "dreambooth")
            data = {"kind": "shapes", "shapes": ["star"]} if fine else DATA
            cfg = TrainConfig(network=network, steps=3, batch_size=4, lr=1e-3, checkpoint_every=3,
                              out=f"{out}/{name}", model={} if fine else TINY, data=data, extra=extra)
            (finetune if fine else RECIPES[network])(cfg, progress=False)


if __name__ == "__main__":
    main(*sys.argv[1:])
