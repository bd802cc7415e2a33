"""The `plainsd` command: argument parsing -> the same public functions a Python user calls."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXAMPLES = """examples:
  plainsd txt2img "a red circle on the left" --steps 20 --seed 1 -o circle.png
  plainsd txt2img "a cat" --model v1-5-pruned-emaonly.safetensors --sampler "Euler a" --cfg-scale 7
  plainsd txt2img "a red circle" --hires --hires-scale 2 --hires-strength 0.5 -o circle-hires.png
  plainsd img2img "a blue square" --init-image circle.png --strength 0.6
  plainsd inpaint "a star" --init-image circle.png --mask mask.png --only-masked --inpainting-fill fill
  plainsd txt2img "a red circle" --controlnet plainsd-base.controlnet-canny --control-image edges.png --control-module canny
  plainsd outpaint circle.png "a red circle, a wide field" --left 64 --right 64 -o wide.png
  plainsd upscale circle.png --upscaler plainsd-x4 --scale 4 -o big/
  plainsd upscale photo.png --upscaler "R-ESRGAN 4x+" --scale 2 --upscalers-dir ~/webui/models
  plainsd sd-upscale circle.png "a red circle" --upscaler Lanczos --scale 2 --overlap 16 --strength 0.3
  plainsd xyz "a red circle" --x-type Seed --x-values 1-3 --y-type "CFG Scale" --y-values "3, 7" -o grid.png
  plainsd png-info circle.png
  plainsd detect canny photo.jpg -o edges.png --width 512 --height 768 --pixel-perfect
  plainsd detect openpose_json pose.json -o pose.png
  plainsd merge a.safetensors b.safetensors --method weighted-sum --multiplier 0.3 -o merged.safetensors
  plainsd convert v1-5-pruned.ckpt v1-5.safetensors --dtype fp16
  plainsd convert sd_xl_base_1.0.safetensors sdxl-base/      # a diffusers folder (and back: swap them)
  plainsd serve --models-dir models --port 7860
  plainsd batch requests.jsonl -o out --workers 2 --threads 1
"""


def _common(p: argparse.ArgumentParser, strength: float | None = None):
    p.add_argument("prompt", help="what to draw (A1111 syntax: (word:1.3), [word], BREAK, [from:to:when] editing, "
                                  "[a|b] alternation, a AND b:0.5; see docs/generation.md)")
    p.add_argument("--negative-prompt", default="", help="what not to draw")
    p.add_argument("--steps", type=int, default=None, help="default: the model's recommendation, else 20")
    p.add_argument("--sampler", default=None,
                   help='A1111 name, e.g. "Euler a", "DPM++ 2M Karras" (see: plainsd samplers); default: the model\'s, else DPM++ 2M')
    p.add_argument("--schedule", default=None, help="schedule type: automatic, karras, exponential, ...")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (1 = off); default: the model's, else 7")
    p.add_argument("--guidance-until", type=float, default=None,
                   help="guidance for this fraction of the steps only, 0..1 (1 = all); default: the model's, else 1")
    p.add_argument("--seed", type=int, default=-1, help="-1 for a random seed; image i gets seed + i")
    p.add_argument("--width", type=int, default=None, help="multiple of 8; default: the model's resolution")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1, help="images per batch")
    p.add_argument("--batch-count", type=int, default=1, help="batches, one after the other")
    p.add_argument("--clip-skip", type=int, default=None, help="1 = last CLIP layer, 2 = penultimate (SD2's default)")
    p.add_argument("--eta", type=float, default=None,
                   help="noise multiplier of ancestral, SDE, DPM fast/adaptive (default 1) and DDIM (default 0) samplers; "
                        "TCD's gamma (default 0.3)")
    v = p.add_argument_group("variation seeds, seed resize, tiling, sampler noise (A1111's)")
    v.add_argument("--subseed", type=int, default=-1, help="variation seed (-1 random); image i gets subseed + i")
    v.add_argument("--subseed-strength", type=float, default=0.0,
                   help="0 = the seed's noise, 1 = the variation seed's; between: blended (slerp); default 0")
    v.add_argument("--seed-resize-from-w", type=int, default=0, help="draw the noise at this width (and -h) instead, "
                                                                      "placed centred: a seed's picture at another size")
    v.add_argument("--seed-resize-from-h", type=int, default=0)
    v.add_argument("--tiling", action="store_true", help="a seamless picture: its edges continue each other")
    v.add_argument("--s-churn", type=float, default=None, help="Euler, Heun, DPM2: noise added back each step (0 = off)")
    v.add_argument("--s-tmin", type=float, default=None, help="churn only at sigmas from this (default 0) ...")
    v.add_argument("--s-tmax", type=float, default=None, help="... to this (default 0 = no limit)")
    v.add_argument("--s-noise", type=float, default=None, help="scale of the noise samplers add (default 1)")
    v.add_argument("--ensd", type=int, default=0, metavar="DELTA",
                   help="A1111's eta noise seed delta: the sampler's added noise from seed + DELTA (default 0 = off)")
    v.add_argument("--ngms", type=float, default=0.0, metavar="SIGMA",
                   help="A1111's negative guidance minimum sigma: below it every second model call skips the negative "
                        "prompt (faster, less exact; default 0 = off)")
    v.add_argument("--rng", default="GPU", metavar="SOURCE",
                   help="A1111's random number source: GPU (default) and CPU draw torch's CPU numbers, as A1111 "
                        "does without a GPU; NV the numbers an NVIDIA GPU draws, for its seeds' pictures")
    if strength is not None:
        p.add_argument("--strength", "--denoising-strength", type=float, default=strength,
                       help=f"0 keeps the image, 1 replaces it (default {strength})")
    p.add_argument("-o", "--output", default=None, help="output PNG (several images: NAME-1.png, ...); default outputs/")
    p.add_argument("--model", default=None, help="checkpoint file or diffusers folder; default: the shipped model")
    p.add_argument("--refiner", default=None, metavar="PATH",
                   help="a checkpoint that takes the latents over at --refiner-switch-at (A1111's refiner; SDXL's)")
    p.add_argument("--refiner-switch-at", type=float, default=None, metavar="F",
                   help="the fraction of the denoising done before the refiner takes over (default 0.8)")
    p.add_argument("--checkpoints-limit", type=int, default=None, choices=range(1, 11), metavar="N",
                   help="A1111's sd_checkpoints_limit with --refiner: 1 (default) keeps one UNet in memory, the idle "
                        "one written to a temporary file; 2 keeps both (faster, more memory)")
    p.add_argument("--prediction", choices=["eps", "v", "x0"], default=None,
                   help="override what the model predicts: the noise, the velocity or the clean sample")
    p.add_argument("--lora-dir", default=None, help="folder of LoRA files, used by <lora:name:weight> in the prompt")
    p.add_argument("--embeddings-dir", default=None, help="folder of textual-inversion embeddings, used by name in prompts")
    p.add_argument("--vae", default=None, help="a VAE to decode with instead of the model's own (and the refiner's): "
                                               "a file or diffusers folder, a name in --vae-dir or of a NAME.vae.* "
                                               "file beside the model, Automatic or None (A1111's sd_vae; default "
                                               "Automatic: a VAE whose name starts with the model's)")
    p.add_argument("--vae-dir", default=None, help="folder of VAE files (A1111's models/VAE)")
    _style_args(p)
    _controlnet_args(p)
    _runtime_args(p)
    p.add_argument("--fast", action="store_true",
                   help="fast mode: DeepCache (the whole UNet every 2nd step, every 4th on the last 40%%), guidance for the first 60%% of the steps (less exact)")
    p.add_argument("--tiny-decoder", nargs="?", const=True, default=False, metavar="FILE",
                   help="decode with a tiny (TAESD) decoder: the model's (NAME.taesd.safetensors beside it) or FILE "
                        "(TAESD's or diffusers' taesd decoder .safetensors); faster, less exact")
    p.add_argument("--token-merging", type=float, default=0.0, metavar="RATIO",
                   help="A1111's token merging ratio: merge that fraction of the full-resolution tokens before "
                        "self-attention (0.5 is usual; faster at 512 px and up, less exact; default 0 = off)")
    p.add_argument("--save-steps", action="store_true", help="also write the denoising process as a GIF and a contact sheet")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


def _style_args(p: argparse.ArgumentParser):
    p.add_argument("--style", dest="styles", action="append", default=[], metavar="NAME",
                   help="apply this style of the styles file to the prompts (repeatable; in the order given)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--styles-file", default=None, metavar="PATH",
                       help="A1111's styles.csv (columns name, prompt, negative_prompt) or a wildcard such as "
                            "'styles/*.csv'; default: styles.csv in the current folder")
    group.add_argument("--styles-dir", default=None, metavar="DIR", help="a folder of styles .csv files")


# The command line's spellings of the ControlNet extension's control modes and resize modes, in one table.
CONTROL_NAMES = {"balanced": "Balanced", "prompt": "My prompt is more important",
                 "controlnet": "ControlNet is more important", "just-resize": "Just Resize",
                 "crop-and-resize": "Crop and Resize", "resize-and-fill": "Resize and Fill"}
# Each unit's flags: flag -> (ControlUnit field, type); the n-th of each belongs to the n-th --controlnet.
CONTROL_FLAGS = {"control_image": ("image", str), "control_module": ("module", str),
                 "control_weight": ("weight", float), "control_start": ("guidance_start", float),
                 "control_end": ("guidance_end", float), "control_mode": ("control_mode", str),
                 "control_resize_mode": ("resize_mode", str), "control_res": ("processor_res", int),
                 "control_threshold_a": ("threshold_a", float), "control_threshold_b": ("threshold_b", float),
                 "control_pixel_perfect": ("pixel_perfect", str)}


def _controlnet_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("ControlNet", "units as A1111's ControlNet extension has them; repeat --controlnet for "
                                           "several, the n-th of each flag below belonging to the n-th unit")
    g.add_argument("--controlnet", action="append", default=[], metavar="MODEL",
                   help="a ControlNet: a name in --controlnet-dir (with or without its [hash]), the shipped "
                        "plainsd-base.controlnet-canny, or a file or diffusers folder")
    g.add_argument("--controlnet-dir", default=None, metavar="DIR", help="folder of ControlNet files (A1111's models/ControlNet)")
    g.add_argument("--control-image", action="append", default=[], metavar="IMG",
                   help="the unit's picture; img2img and inpaint: leave out (or 'init') to use the init image")
    g.add_argument("--control-module", action="append", default=[], metavar="NAME",
                   help="preprocessor: none (the picture is the hint; default), canny, ...")
    g.add_argument("--control-weight", action="append", default=[], metavar="W", help="0 to 2 (default 1)")
    g.add_argument("--control-start", action="append", default=[], metavar="F",
                   help="fraction of the steps before which the unit is off (default 0)")
    g.add_argument("--control-end", action="append", default=[], metavar="F",
                   help="fraction of the steps after which the unit is off (default 1)")
    g.add_argument("--control-mode", action="append", default=[], choices=["balanced", "prompt", "controlnet"],
                   help="balanced (default), prompt (my prompt is more important), controlnet (ControlNet is more important)")
    g.add_argument("--control-resize-mode", action="append", default=[],
                   choices=["just-resize", "crop-and-resize", "resize-and-fill"],
                   help="how the hint is fitted to the picture (default crop-and-resize)")
    g.add_argument("--control-res", action="append", default=[], metavar="PX",
                   help="the preprocessor's resolution, 64 to 2048 (default 512)")
    g.add_argument("--control-threshold-a", action="append", default=[], metavar="X",
                   help="the preprocessor's first setting (canny: low threshold, default 100)")
    g.add_argument("--control-threshold-b", action="append", default=[], metavar="X",
                   help="its second (canny: high threshold, default 200)")
    g.add_argument("--control-pixel-perfect", action="append", default=[], nargs="?", const="on",
                   choices=["on", "off"], help="the preprocessor's resolution from the picture's size (on; or off)")


def _control_units(args) -> tuple:
    """The units the ControlNet flags ask for: the n-th of each flag goes to the n-th --controlnet."""
    from plainsd.request import ControlUnit

    models = args.controlnet
    for flag in CONTROL_FLAGS:
        given = getattr(args, flag)
        if len(given) > len(models):
            raise ValueError(f"--{flag.replace('_', '-')} was given {len(given)} times but --controlnet "
                             f"{len(models)} times; each unit's flags belong to the --controlnet of the same place")
    units = []
    for i, model in enumerate(models):
        fields = {}
        for flag, (name, kind) in CONTROL_FLAGS.items():
            values = getattr(args, flag)
            if i < len(values):
                fields[name] = _control_value(flag, values[i], kind)
        if fields.get("image", "init") == "init":
            fields.pop("image", None)
        else:
            fields["image"] = _open_image(fields["image"])
        units.append(ControlUnit(model, **fields))
    return tuple(units)


def _control_value(flag: str, text: str, kind):
    if flag == "control_pixel_perfect":
        return text == "on"
    if flag in ("control_mode", "control_resize_mode"):
        return CONTROL_NAMES[text]
    try:
        return kind(text)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"--{flag.replace('_', '-')} takes {what}, got {text!r}") from None


def _hires_args(p: argparse.ArgumentParser):
    hr = p.add_argument_group("hires fix", "a second pass at a larger size (A1111's Hires. fix); any of these turns it on")
    hr.add_argument("--hires", action="store_true", help="on, with the defaults below")
    hr.add_argument("--hires-scale", type=float, default=None, help="upscale by (default 2)")
    hr.add_argument("--hires-width", type=int, default=None, help="the final width instead of --hires-scale")
    hr.add_argument("--hires-height", type=int, default=None, help="the final height (both: cropped to fill)")
    hr.add_argument("--hires-upscaler", default=None,
                    help='"Latent" (default), "Latent (antialiased)", "Latent (bicubic)", "Latent (nearest-exact)", ... '
                         'an image one: "Lanczos", "Nearest", or an upscaler model by name (plainsd-x4, the files '
                         'of --upscalers-dir)')
    hr.add_argument("--hires-steps", type=int, default=None, help="second-pass steps (default: --steps)")
    hr.add_argument("--hires-strength", type=float, default=None, help="second-pass denoising strength (default 0.7)")
    hr.add_argument("--hires-sampler", default=None, help="second-pass sampler (default: --sampler)")
    hr.add_argument("--hires-prompt", default=None, help="second-pass prompt (default: the prompt)")
    hr.add_argument("--hires-token-merging", type=float, default=None, metavar="RATIO",
                    help="second-pass token merging ratio (default: --token-merging)")
    _upscaler_args(hr)


def _upscaler_args(p):
    p.add_argument("--upscalers-dir", default=None, metavar="DIR",
                   help="upscaler model files (ESRGAN, Real-ESRGAN, SwinIR, DAT, HAT ...): A1111's models folder "
                        "(its ESRGAN/, RealESRGAN/ ... subfolders) or one folder of files; pip install 'plainsd[upscale]'")
    p.add_argument("--upscaler-tile", type=int, default=192, metavar="PIXELS",
                   help="an upscaler model runs on tiles this large (A1111's ESRGAN_tile; 0: whole; default 192)")
    p.add_argument("--upscaler-tile-overlap", type=int, default=8, metavar="PIXELS",
                   help="pixels the tiles share, blended (A1111's ESRGAN_tile_overlap; default 8)")


def _upscale_parsers(sub) -> None:
    """plainsd upscale (A1111's Extras) and plainsd sd-upscale (its SD upscale script)."""
    p = sub.add_parser("upscale", help="upscale pictures with an upscaler model or Lanczos (A1111's Extras)")
    p.add_argument("images", nargs="+", help="the pictures")
    p.add_argument("--upscaler", required=True, help="plainsd-x4, Lanczos, Nearest, or a model of --upscalers-dir")
    p.add_argument("--scale", type=float, default=4.0, help="upscale by, 1 to 8 (default 4; sizes round down to 8)")
    p.add_argument("--width", type=int, default=None, help="instead of --scale: fill this width and --height ...")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--no-crop", action="store_true", help="... without cropping to exactly that size")
    p.add_argument("--upscaler-2", default="None", help="a second upscaler whose result is blended in")
    p.add_argument("--upscaler-2-visibility", type=float, default=0.0, metavar="V", help="how much of it, 0 to 1")
    p.add_argument("-o", "--output", default="outputs/extras", metavar="DIR", help="folder (default outputs/extras)")
    _upscaler_args(p)
    _runtime_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true")
    p = sub.add_parser("sd-upscale", help="upscale a picture, then redraw it tile by tile (A1111's SD upscale)")
    p.add_argument("image", help="the picture to upscale")
    _common(p, strength=0.3)
    p.add_argument("--upscaler", default="Lanczos", help="what upscales it first (default Lanczos; None: not at all)")
    p.add_argument("--scale", type=float, default=2.0, help="upscale by, 1 to 8 (default 2)")
    p.add_argument("--overlap", type=int, default=64, help="pixels the tiles (--width x --height) share (default 64)")
    _upscaler_args(p)


def _xyz_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("X/Y/Z plot")
    for axis, required in (("x", True), ("y", False), ("z", False)):
        g.add_argument(f"--{axis}-type", required=required, default="Nothing", metavar="TYPE",
                       help=f"the {axis.upper()} axis: an A1111 axis type such as Seed, Steps, \"CFG Scale\"")
        g.add_argument(f"--{axis}-values", required=required, default="", metavar="VALUES",
                       help=f"the {axis.upper()} values: \"1, 2, 3\", \"1-5 (+2)\", \"1-10 [5]\"; model files for "
                            "Checkpoint name; the first Prompt S/R value is the one replaced")
    g.add_argument("--no-legend", action="store_true", help="no labels around the grid")
    g.add_argument("--include-lone-images", action="store_true", help="also write each cell's picture")
    g.add_argument("--include-sub-grids", action="store_true", help="also write each Z value's grid")
    g.add_argument("--no-fixed-seeds", action="store_true", help="with --seed -1, a random seed in each cell")
    for axis in "xyz":
        g.add_argument(f"--vary-seeds-{axis}", action="store_true", help=f"seed + the cell's place along {axis.upper()}")
    g.add_argument("--margin-size", type=int, default=0, help="pixels between the cells (0 to 500)")


def _runtime_args(p: argparse.ArgumentParser):
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: one per core)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="the networks' number format; auto = bf16 where the CPU has native bf16 (avx512_bf16/AMX), "
                        "else fp32 (SDXL: fp16 weights computed in fp32, as fp16 does)")
    p.add_argument("--backend", choices=["eager", "openvino"], default="eager",
                   help="openvino: run the UNet compiled by OpenVINO (pip install 'plainsd[openvino]'); cached on disk")


def _inpainting_fill(p: argparse.ArgumentParser, default: str):
    p.add_argument("--inpainting-fill", "--masked-content", default=default,
                   choices=["fill", "original", "latent noise", "latent nothing"],
                   help=f"what the masked area starts from (A1111's Masked content; default {default})")


def _noise_multiplier(p: argparse.ArgumentParser):
    p.add_argument("--noise-multiplier", "--initial-noise-multiplier", type=float, default=1.0, metavar="X",
                   help="the starting noise times X, 0 to 1.5 (A1111's Noise multiplier for img2img; default 1)")


def _caption_args(sub) -> None:
    p = sub.add_parser("caption", help="write a caption for each picture of a folder (for training)",
                       description="Captions for fine-tuning: kohya's same-name .txt beside each picture, or a "
                                   "metadata.jsonl (Hugging Face imagefolder: file_name, text). Pictures that already "
                                   "have a caption are skipped unless --overwrite.")
    p.add_argument("folder", help="the folder of pictures (.png, .jpg, .jpeg, .webp, .bmp; not its subfolders)")
    p.add_argument("--captioner", default=None, metavar="NAME|PATH",
                   help="plainsd (default: the shipped captioner of the shapes world), a file from `plainsd train "
                        "captioner`, or a BLIP captioning model's folder")
    p.add_argument("--format", default="txt", choices=["txt", "jsonl"], help="txt (default): a .txt per picture; "
                                                                              "jsonl: metadata.jsonl")
    p.add_argument("--prefix", default="", help="put before each caption as given, e.g. 'sks, '")
    p.add_argument("--suffix", default="", help="put after each caption as given, e.g. ', sks style'")
    p.add_argument("--overwrite", action="store_true", help="caption again the pictures that have a caption")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto = a BLIP model in bf16 where the CPU has native bf16, else fp32; the captioner of the "
                        "shapes world in fp32")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true")


def _detect_args(sub) -> None:
    from plainsd.detectors import MODULES, RESIZE_MODES

    runnable = ", ".join(name for name, m in MODULES.items() if not m.needs_weights)
    p = sub.add_parser("detect", help="make a ControlNet hint from a picture (a preprocessor) or a pose JSON",
                       description=f"Preprocessors (A1111 ControlNet extension names): {runnable}; and openpose_json, "
                                   "which draws the OpenPose skeleton of a pose JSON file (OpenPose's format).")
    p.add_argument("module", help="the preprocessor, e.g. canny")
    p.add_argument("image", help="the picture (for openpose_json: the pose .json file)")
    p.add_argument("-o", "--output", required=True, help="the hint, a .png file")
    p.add_argument("--resolution", type=int, default=None, help="the preprocessor resolution: the hint's short side "
                                                              "before fitting (default 512)")
    p.add_argument("--threshold-a", type=float, default=None, help="the module's first setting (default: its own)")
    p.add_argument("--threshold-b", type=float, default=None, help="the module's second setting (default: its own)")
    p.add_argument("--width", type=int, default=None, help="fit the hint to this size (with --height), as a "
                                                           "generation of that size would; openpose_json: the canvas")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--resize-mode", default=None, choices=RESIZE_MODES,
                   help="how the hint is fitted to --width x --height (default Crop and Resize)")
    p.add_argument("--pixel-perfect", action="store_true",
                   help="choose the resolution that needs no resizing to --width x --height")
    p.add_argument("--debug", action="store_true")


def _merge_args(sub):
    p = sub.add_parser("merge", help="A1111's checkpoint merger: weighted sum, add difference, VAE bake-in, fp16",
                       description="(1-M)*A + M*B (weighted-sum) or A + M*(B-C) (add-difference), as A1111's merger; "
                                   "the merge recipe goes into the file's metadata (sd_merge_recipe).")
    p.add_argument("models", nargs="+", metavar="MODEL", help="A and B (and C for add-difference): checkpoint files")
    p.add_argument("--method", default="weighted-sum", choices=["weighted-sum", "add-difference", "none"],
                   help="none: A alone (to bake in a VAE, halve or drop tensors)")
    p.add_argument("--multiplier", "-M", type=float, default=0.3, help="M (A1111's default 0.3)")
    p.add_argument("--vae", default=None, help="a VAE file or folder to bake in (replaces A's VAE)")
    p.add_argument("--half", action="store_true", help="save float16 weights")
    p.add_argument("--discard", default="", metavar="REGEX", help="drop the tensors whose keys match (e.g. model_ema)")
    p.add_argument("-o", "--output", default=None,
                   help="the merged .safetensors file, or a folder for A1111's name; default: A's folder")
    p.add_argument("--debug", action="store_true")


def _convert_args(sub):
    p = sub.add_parser("convert", help="convert a checkpoint: .ckpt -> .safetensors, single file <-> diffusers "
                                       "folder, fp32 / fp16 / bf16, checked",
                       description="IN: a .safetensors or .ckpt/.pt file (read with weights_only) or a diffusers "
                                   "folder. OUT: a .safetensors file in the original layout, or a diffusers folder "
                                   "(a path without a suffix, or ending in /). The result holds the model only "
                                   "(no EMA copies or optimizer states) and is checked against the input before "
                                   "it is put in place (see docs/generation.md).")
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="the weights' number format (default: the input's)")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="load the result back and compare its outputs with the input's on fixed inputs (default: on)")
    p.add_argument("--ema", action="store_true", help="take the UNet's EMA weights (model_ema.*) instead of the live ones")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (once the result passed the check)")
    p.add_argument("--debug", action="store_true")


def _batch_args(sub):
    p = sub.add_parser("batch", help="draw a JSON-lines file of A1111 requests, locally or on a Ray cluster",
                       description="One A1111 txt2img or img2img request (the JSON /sdapi/v1/txt2img or img2img "
                                   "takes) per line. Pictures and OUT/manifest.jsonl are written as requests finish; "
                                   "a rerun skips what the manifest holds (see docs/batch.md).")
    p.add_argument("requests", help="the .jsonl file")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="the output folder")
    p.add_argument("--model", default=None, help="checkpoint file or diffusers folder; default: the shipped model")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes, each loading the model once (default 1: this process); with --ray, "
                        "actors (default: as many as the cluster's CPUs hold)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: the cores shared out; with --ray, 1: the CPUs each "
                        "actor reserves)")
    p.add_argument("--ray", default=None, metavar="auto|local|ADDRESS",
                   help="run on Ray (pip install 'plainsd[ray]'): auto = the cluster started here with `ray start`, "
                        "local = a new one for this run only, else the head's address")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="the networks' number format; auto = bf16 where the CPU that runs the batch has it")
    p.add_argument("--backend", choices=["eager", "openvino"], default="eager")
    p.add_argument("--lora-dir", default=None, help="folder of LoRA files for <lora:name:weight> in prompts")
    p.add_argument("--embeddings-dir", default=None, help="folder of textual-inversion embeddings")
    p.add_argument("--styles", default=None, metavar="PATH", help="A1111's styles.csv for the requests' styles")
    p.add_argument("--controlnet-dir", default=None, help="folder of ControlNet models the requests' units name")
    p.add_argument("--upscalers-dir", default=None, metavar="DIR",
                   help="upscaler models the requests' hr_upscaler names (A1111's models folder or one folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plainsd", description="Stable Diffusion in plain PyTorch, on the CPU.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("txt2img", help="text to image")
    _common(p)
    _hires_args(p)
    p = sub.add_parser("img2img", help="image to image")
    _common(p, strength=0.8)
    p.add_argument("--init-image", required=True)
    p.add_argument("--resize-mode", default="just resize",
                   choices=["just resize", "crop and resize", "resize and fill", "just resize (latent upscale)"])
    _noise_multiplier(p)
    p = sub.add_parser("inpaint", help="repaint the white part of a mask")
    _common(p, strength=0.75)
    p.add_argument("--init-image", required=True)
    p.add_argument("--mask", required=True, help="white = repaint, black = keep (an RGBA mask with transparency: "
                                                 "its opaque part = repaint)")
    p.add_argument("--mask-blur", type=int, default=4)
    p.add_argument("--invert-mask", action="store_true")
    p.add_argument("--resize-mode", default="just resize", choices=["just resize", "crop and resize", "resize and fill"])
    _inpainting_fill(p, "original")
    p.add_argument("--only-masked", "--inpaint-full-res", action="store_true",
                   help="draw only the masked area (its box plus --only-masked-padding) at --width x --height, then "
                        "paste it back: more detail for a small area (A1111's Inpaint area: Only masked)")
    p.add_argument("--only-masked-padding", "--inpaint-full-res-padding", type=int, default=32, metavar="PIXELS",
                   help="pixels around the masked area's box with --only-masked (default 32)")
    p.add_argument("--no-mask-round", action="store_true",
                   help="keep the blurred mask's soft edge in the latents instead of cutting it to 0 or 1")
    p.add_argument("--latent-mask", default=None, metavar="FILE",
                   help="a second mask for the latents and the fill only (A1111's latent_mask)")
    _noise_multiplier(p)
    p = sub.add_parser("outpaint", help="extend a picture on any side and draw the new area")
    p.add_argument("image", help="the picture to extend")
    _common(p, strength=0.75)
    for side in ("left", "right", "top", "bottom"):
        p.add_argument(f"--{side}", type=int, default=0, metavar="PIXELS",
                       help=f"pixels to add on the {side} (the canvas is rounded up to multiples of 64)")
    p.add_argument("--mask-blur", type=int, default=4, help="blur of the seam (A1111 doubles it; default 4)")
    _inpainting_fill(p, "fill")
    p = sub.add_parser("xyz", help="A1111's X/Y/Z plot: a labelled grid of pictures over up to three axes' values",
                       description="Axis types are A1111's labels (Seed, Steps, CFG Scale, Sampler, Schedule type, "
                                   "Prompt S/R, Checkpoint name, Denoising, Hires steps, Token merging ratio, ...); "
                                   "values are comma separated, numbers also as ranges: 1-5, 1-5 (+2), 1-10 [5].")
    _common(p)
    _hires_args(p)
    _xyz_args(p)
    _upscale_parsers(sub)
    p = sub.add_parser("png-info", help="print the generation parameters stored in an image")
    p.add_argument("image")
    p.add_argument("--json", action="store_true", help="as JSON fields")
    p.add_argument("--debug", action="store_true")
    _detect_args(sub)
    _caption_args(sub)
    p = sub.add_parser("samplers", help="list samplers and schedules")
    p.add_argument("--debug", action="store_true")
    p = sub.add_parser("train", help="train the VAE, CLIP, the UNet, a ControlNet, an LCM-LoRA, the x4 upscaler or "
                                        "the captioner from a config file")
    p.add_argument("network", choices=["vae", "vae-decoder", "clip", "unet", "taesd", "controlnet", "lcm", "upscaler",
                                        "captioner"])
    p.add_argument("--config", default=None, help="a JSON training config, or a shipped recipe's name such as "
                                                   "unet-objects (default: the shipped recipe named after the network)")
    p.add_argument("--out", default=None, help="run folder (checkpoints, samples, exported weights)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--hint", default=None, help="controlnet only: the preprocessor that makes the hints (the config's "
                                                "extra.hint; default: the shipped recipe controlnet-canny)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--debug", action="store_true")
    p = sub.add_parser("eval", help="measure a model on held-out prompts (JSON)")
    p.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--prompts", type=int, default=100, help="held-out single-object prompts")
    p.add_argument("--two-object-prompts", type=int, default=50)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg-scale", type=float, default=5.0)
    p.add_argument("--guidance-until", type=float, default=None,
                   help="guidance for this fraction of the steps (default: the model's recommendation, else 1)")
    p.add_argument("--sampler", default="DPM++ 2M")
    p.add_argument("--schedule", default="karras")
    p.add_argument("--vae", default=None, help="a VAE training's vae.safetensors, or a whole checkpoint: PSNR and "
                                                   "the judge on VAE round trips")
    p.add_argument("--taesd", default=None, help="with --vae: a tiny decoder file (fast mode's), judged on round trips "
                                                   "through the VAE's encoder and this decoder")
    p.add_argument("--clip", default=None, help="a CLIP training's clip.safetensors, for retrieval")
    p.add_argument("--checks", action="store_true",
                   help="also: adherence against CFG 1..5, the negative prompt 'red' on 'a circle', img2img at 0.3")
    p.add_argument("--concept-prompt", default=None, help='fine-tuning proof: how often this prompt draws --concept-shape')
    p.add_argument("--concept-shape", default="heart")
    p.add_argument("--concept-images", type=int, default=50, help="images drawn for --concept-prompt")
    p.add_argument("--lora-dir", default=None, help="for <lora:...> in --concept-prompt")
    p.add_argument("--embeddings-dir", default=None, help="for embeddings in --concept-prompt")
    p.add_argument("--fast", action="store_true", help="measure fast mode (the adherence prompts)")
    _runtime_args(p)
    p.add_argument("-o", "--output", default=None, help="also write the JSON here")
    p.add_argument("--debug", action="store_true")
    p = sub.add_parser("finetune", help="teach a model from a few images: dreambooth, textual-inversion, lora")
    p.add_argument("method", choices=["dreambooth", "textual-inversion", "lora"])
    p.add_argument("--config", default=None, help="a JSON config, or a shipped recipe's name such as "
                                                  "finetune-textual-inversion-thing (default: the shipped recipe "
                                                  "finetune-METHOD, which teaches the shipped model a heart)")
    p.add_argument("--model", default=None, help="the base checkpoint (default: the shipped model)")
    p.add_argument("--data", default=None, help="folder of instance images (captions: same-name .txt or metadata.jsonl)")
    p.add_argument("--instance-prompt", default=None, help='one caption for every instance image, e.g. "a sks heart"')
    p.add_argument("--class-prompt", action="append", default=None,
                   help="dreambooth prior preservation: a class prompt (repeatable); the base model draws the class images")
    p.add_argument("--num-class-images", type=int, default=None)
    p.add_argument("--prior-weight", type=float, default=None, help="weight of the prior-preservation loss")
    p.add_argument("--train-text-encoder", action="store_true", default=None,
                   help="dreambooth / lora: also the text encoder (SDXL: both towers)")
    p.add_argument("--token", default=None, help="textual inversion: the embedding's name, as written in prompts")
    p.add_argument("--init-word", default=None, help="textual inversion: the word whose vectors start it")
    p.add_argument("--vectors", type=int, default=None, help="textual inversion: vectors per token")
    p.add_argument("--rank", type=int, default=None, help="lora: rank")
    p.add_argument("--alpha", type=float, default=None, help="lora: alpha (the update is scaled by alpha / rank)")
    p.add_argument("--max-train-steps", type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--lr-schedule", choices=["constant", "cosine", "cosine_with_restarts"], default=None)
    p.add_argument("--lr-cycles", type=int, default=None, help="cycles of cosine_with_restarts")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--validation-prompt", action="append", default=None, help="drawn into samples/ (repeatable)")
    p.add_argument("--sample-every", type=int, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--out", default=None, help="run folder (checkpoint, samples, the result)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--debug", action="store_true")
    p = sub.add_parser("lora", help="LoRA files: merge one into a checkpoint")
    lsub = p.add_subparsers(dest="lora_command", required=True)
    q = lsub.add_parser("merge", help="add a LoRA into a checkpoint's weights and save a new checkpoint")
    q.add_argument("base", help="the checkpoint (single file or diffusers folder)")
    q.add_argument("lora", help="a LoRA file in the kohya / A1111 format")
    q.add_argument("--weight", type=float, default=1.0, help="the LoRA's strength, as in <lora:name:weight>")
    q.add_argument("-o", "--output", required=True, help="the merged checkpoint (.safetensors)")
    q.add_argument("--half", action="store_true", help="save float16 weights")
    q.add_argument("--debug", action="store_true")
    _merge_args(sub)
    _convert_args(sub)
    p = sub.add_parser("serve", help="an AUTOMATIC1111-compatible HTTP API and a web page")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--model", default=None, help="one checkpoint to serve (default: the shipped model)")
    group.add_argument("--models-dir", default=None, help="a folder of checkpoints; clients choose among them")
    p.add_argument("--host", default="127.0.0.1", help="default loopback only; 0.0.0.0 listens on every interface")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api-auth", default=None, help="user:password (several separated by commas) for HTTP basic auth")
    p.add_argument("--max-queue", type=int, default=16, help="jobs that may wait; more get 503")
    p.add_argument("--max-size", type=int, default=2048, help="largest width or height a request may ask for")
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--max-images", type=int, default=16, help="most images per request (batch size x count)")
    p.add_argument("--outputs", default="outputs/api", help="where save_images=true requests write")
    p.add_argument("--lora-dir", default=None, help="folder of LoRA files for <lora:name:weight> in prompts")
    p.add_argument("--embeddings-dir", default=None, help="folder of textual-inversion embeddings")
    p.add_argument("--controlnet-dir", default=None,
                   help="folder of ControlNet models (A1111's models/ControlNet), offered besides the shipped one")
    p.add_argument("--vae-dir", default=None,
                   help="folder of VAE files (A1111's models/VAE) for the sd_vae setting (/sdapi/v1/sd-vae lists them)")
    p.add_argument("--styles", default=None, metavar="PATH",
                   help="A1111's styles.csv (or a folder of .csv files, or a wildcard) for the requests' styles")
    p.add_argument("--upscalers-dir", default=None, metavar="DIR",
                   help="upscaler models for Extras, the hires fix and SD upscale: A1111's models folder (ESRGAN/, "
                        "RealESRGAN/ ...) or one folder of files, offered besides the shipped plainsd-x4")
    p.add_argument("--captioner", default=None, metavar="NAME|PATH",
                   help="what /sdapi/v1/interrogate captions with: plainsd (default: the shipped captioner), a file "
                        "from `plainsd train captioner`, or a BLIP captioning model's folder")
    _runtime_args(p)
    p.add_argument("--debug", action="store_true")
    _batch_args(sub)
    p = sub.add_parser("demo", help="draw one picture with the default model and say where it is")
    p.add_argument("-o", "--output", default="outputs/demo.png")
    p.add_argument("--debug", action="store_true")
    return parser


def _load_model(path: str | None, prediction: str | None, precision: str = "auto", backend: str = "eager"):
    """The model at path (default: the shipped one), prepared to run here: a runtime.Engine."""
    import plainsd
    from plainsd import runtime
    from plainsd.weights import DEFAULT_MODEL, read_config

    if path is None and not DEFAULT_MODEL.is_file():
        print("plainsd: note: no default model is shipped yet; drawing with a random tiny model (expect noise). "
              "Pass --model PATH for a real checkpoint.", file=sys.stderr)
        return runtime.prepare(plainsd.build("tiny", seed=0).to(runtime.choose_dtype(precision)), backend)
    dtype = runtime.choose_dtype(precision, read_config(path))  # (SDXL without native bf16: fp16 weights)
    sd = plainsd.load(path, prediction=prediction, dtype=dtype)
    if Path(path or DEFAULT_MODEL).is_file():
        from plainsd.weights import short_hash
        sd.hash = short_hash(path or DEFAULT_MODEL)  # A1111's "Model hash" in the infotext
    return runtime.prepare(sd, backend)


def _open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
        return image
    except FileNotFoundError:
        raise ValueError(f"no such image file: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def _outputs(args, n: int, seeds: list[int], kind: str) -> list[Path]:
    if args.output:
        out = Path(args.output)  # its .png suffix was checked before the model was loaded
        return [out] if n == 1 else [out.with_name(f"{out.stem}-{i + 1}{out.suffix}") for i in range(n)]
    folder = Path("outputs") / kind
    folder.mkdir(parents=True, exist_ok=True)
    start = 1 + max([int(p.name[:5]) for p in folder.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")] or [0])
    return [folder / f"{start + i:05d}-{s}.png" for i, s in enumerate(seeds)]


def _generate(args) -> int:
    import torch

    from plainsd import pipeline
    from plainsd.pnginfo import save_png

    if args.threads:
        torch.set_num_threads(args.threads)
    request = _request(args)
    request.check(backend=args.backend)  # the cheap things before a model is loaded
    if args.output and Path(args.output).suffix.lower() != ".png":
        raise ValueError(f"the output must be a .png file, got {Path(args.output).name}")
    engine = _engine(args)
    started = time.perf_counter()
    result = pipeline.generate(engine, request, progress=not args.quiet, record_steps=args.save_steps)
    elapsed = time.perf_counter() - started
    for note in result.parameters.notes:
        print(f"plainsd: note: {note}", file=sys.stderr)
    paths = _outputs(args, len(result.images), result.seeds, args.command)
    for i, (image, text, path) in enumerate(zip(result.images, result.infotexts, paths)):
        save_png(image, path, text)
        print(f"{path}  (seed {result.seeds[i]})")
        if args.save_steps and result.frames:
            _save_steps(result.frames[i], path, text)
    print(f"{len(result.images)} image(s) in {elapsed:.1f} s", file=sys.stderr)
    return 0


def _engine(args):
    """The model the generation arguments name, with the tiny decoder --tiny-decoder FILE names."""
    tiny = None
    if isinstance(args.tiny_decoder, str):
        from plainsd.weights import load_tiny_decoder

        tiny = load_tiny_decoder(args.tiny_decoder)  # a wrong file fails here, before the model loads
    if args.fast and args.backend == "openvino":
        print("plainsd: with --backend openvino, --fast stops guidance early but cannot reuse UNet features "
              "(DeepCache needs the eager UNet)", file=sys.stderr)
    if args.checkpoints_limit is not None and args.refiner is None:
        raise ValueError("--checkpoints-limit sets how many UNets a --refiner run keeps in memory; it needs --refiner")
    engine = _load_model(args.model, args.prediction, args.precision, args.backend)
    if args.checkpoints_limit is not None:
        engine.checkpoints_limit = args.checkpoints_limit
    _use_vae(engine, args)
    if tiny is not None:
        engine.use_tiny_decoder(tiny, Path(args.tiny_decoder).name)
    return engine


def _use_vae(engine, args, model: str | None = None):
    """The engine decoding with the VAE --vae and --vae-dir give `model` (default --model), and giving a refiner the
    one they give its checkpoint (engine.vae_for). Returns the engine."""
    from plainsd.weights import DEFAULT_MODEL

    return _put_rule(engine, _vae_rule(args), model or args.model or DEFAULT_MODEL)


def _put_rule(engine, rule, model):
    """The engine decoding with the VAE file rule(model) names, and giving a refiner rule(its checkpoint)."""
    engine.vae_for = rule
    return _put_vae(engine, rule(model))


def _vae_rule(args):
    """checkpoint -> the VAE file (None: its own) as A1111's --vae-path and sd_vae setting give it: --vae a file or
    folder for every checkpoint, else the sd_vae setting --vae names (_sd_vae; default Automatic)."""
    from plainsd import vaes

    if args.vae is not None and args.vae not in (vaes.AUTOMATIC, vaes.NONE) and Path(args.vae).exists():
        return lambda checkpoint: Path(args.vae)
    return _sd_vae(args, args.vae)


def _sd_vae(args, setting: str | None):
    """checkpoint -> the VAE file (None: its own) this sd_vae setting gives it among the listed VAEs (_listed_vaes)
    and the *.vae.* files beside the checkpoint; "Automatic" (and None) is one whose name starts with the
    checkpoint's."""
    from plainsd import vaes

    listed = _listed_vaes(args)

    def choose(checkpoint):
        available = vaes.merge(listed, vaes.beside(checkpoint))
        if setting not in (None, vaes.AUTOMATIC, vaes.NONE) and setting not in available and args.vae_dir is None:
            raise ValueError(f"no such VAE file or folder: {setting} (a name needs --vae-dir, or a file of that "
                             f"name beside the model)")
        return vaes.resolve(setting, checkpoint, available)
    return choose


def _listed_vaes(args) -> dict:
    """The VAEs a name may give for any model (A1111's one list): --vae-dir's files and the *.vae.* files beside
    --model and --refiner."""
    from plainsd import vaes
    from plainsd.weights import DEFAULT_MODEL

    models = [args.model or DEFAULT_MODEL, *([args.refiner] if getattr(args, "refiner", None) else [])]
    return vaes.merge(vaes.find_vaes(args.vae_dir) if args.vae_dir is not None else {}, *map(vaes.beside, models))


def _put_vae(engine, path: Path | None):
    """The engine decoding with the VAE of this file or folder (None: the model's own). Returns the engine."""
    from plainsd.weights import load_vae

    engine.use_vae(load_vae(path, dtype=engine.sd.dtype) if path is not None else None)
    return engine


def _xyz(args) -> int:
    """The X/Y/Z plot: every cell checked, then drawn; the grid (and the cells or sub-grids asked for) written."""
    import torch

    from plainsd import xyz
    from plainsd.pnginfo import save_png
    from plainsd.weights import DEFAULT_MODEL

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.save_steps:
        raise ValueError("--save-steps is for txt2img, img2img and inpaint; the X/Y/Z plot writes no step pictures")
    if args.output and Path(args.output).suffix.lower() != ".png":
        raise ValueError(f"the output must be a .png file, got {Path(args.output).name}")
    request = _request(args)
    request.check(backend=args.backend)
    settings = xyz.XYZSettings(
        args.x_type, args.x_values, None, args.y_type, args.y_values, None, args.z_type, args.z_values, None,
        draw_legend=not args.no_legend, include_lone_images=args.include_lone_images,
        include_sub_grids=args.include_sub_grids, no_fixed_seeds=args.no_fixed_seeds, vary_seeds_x=args.vary_seeds_x,
        vary_seeds_y=args.vary_seeds_y, vary_seeds_z=args.vary_seeds_z, margin_size=args.margin_size, csv_mode=True)
    model = args.model or DEFAULT_MODEL
    found_vaes = _listed_vaes(args)
    checkpoints = xyz.Checkpoints(find=_model_file,
                                  load=lambda path: _use_vae(_load_model(path, args.prediction, args.precision,
                                                                         args.backend), args, path),
                                  vaes=lambda: found_vaes,  # the VAE axis: an sd_vae setting for the cell's model
                                  use_vae=lambda engine, setting, path: _put_rule(engine, _sd_vae(args, setting),
                                                                                  path or model))
    plot = xyz.plan(request, settings, "txt2img", checkpoints,  # all of it checked before a model loads
                    check=lambda cell: cell.check(backend=args.backend))
    started = time.perf_counter()
    result = xyz.run(_engine(args), plot, checkpoints, progress=not args.quiet)
    elapsed = time.perf_counter() - started
    if args.output:
        out = Path(args.output)
        paths = [out] + [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, len(result.images))]
    else:
        paths = _outputs(args, len(result.images), result.seeds, "xyz")
    for image, text, path in zip(result.images, result.infotexts, paths):
        save_png(image, path, text)
        print(path)
    print(f"{len(plot.cells)} cell(s) in {elapsed:.1f} s", file=sys.stderr)
    return 0


def _model_file(name: str) -> str:
    """A Checkpoint name value on the command line: a checkpoint file or diffusers folder."""
    if not Path(name).exists():
        raise ValueError(f"no such model file or folder: {name}")
    return name


def _request(args):
    """The generation request the command line asks for."""
    from plainsd.fast import choose as choose_fast
    from plainsd.request import GenerationRequest

    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, sampler=args.sampler,
        schedule=args.schedule, cfg_scale=args.cfg_scale, guidance_until=args.guidance_until, seed=args.seed,
        width=args.width, height=args.height, batch_size=args.batch_size, batch_count=args.batch_count,
        clip_skip=args.clip_skip, eta=args.eta, lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir,
        fast=choose_fast(args.fast, bool(args.tiny_decoder)), token_merging=args.token_merging,
        hires=_hires(args), subseed=args.subseed, subseed_strength=args.subseed_strength,
        seed_resize_from_w=args.seed_resize_from_w, seed_resize_from_h=args.seed_resize_from_h, tiling=args.tiling,
        s_churn=args.s_churn, s_tmin=args.s_tmin, s_tmax=args.s_tmax, s_noise=args.s_noise,
        eta_noise_seed_delta=args.ensd, randn_source=args.rng, s_min_uncond=args.ngms, styles=args.styles,
        styles_file=args.styles_file or args.styles_dir or "styles.csv", controlnet=_control_units(args),
        controlnet_dir=args.controlnet_dir, upscalers_dir=getattr(args, "upscalers_dir", None),
        upscaler_tile=getattr(args, "upscaler_tile", 192), upscaler_tile_overlap=getattr(args, "upscaler_tile_overlap", 8),
        refiner_checkpoint=args.refiner, refiner_switch_at=args.refiner_switch_at)
    if args.command == "img2img":
        return request.replace(init_image=_open_image(args.init_image), strength=args.strength,
                               resize_mode=args.resize_mode, initial_noise_multiplier=args.noise_multiplier)
    if args.command == "inpaint":
        return request.replace(init_image=_open_image(args.init_image), mask=_open_image(args.mask),
                               strength=args.strength, mask_blur=args.mask_blur, resize_mode=args.resize_mode,
                               inpainting_mask_invert=args.invert_mask, inpainting_fill=args.inpainting_fill,
                               inpaint_full_res=args.only_masked, inpaint_full_res_padding=args.only_masked_padding,
                               mask_round=not args.no_mask_round, initial_noise_multiplier=args.noise_multiplier,
                               latent_mask=_open_image(args.latent_mask) if args.latent_mask else None)
    if args.command == "sd-upscale":
        return request.replace(init_image=_open_image(args.image), strength=args.strength)
    if args.command == "outpaint":
        from plainsd.pipeline import outpaint_request

        if args.width or args.height:
            raise ValueError("outpaint draws the widened canvas at its own size; leave out --width and --height")
        return outpaint_request(request.replace(strength=args.strength), _open_image(args.image), left=args.left,
                                right=args.right, top=args.top, bottom=args.bottom, mask_blur=args.mask_blur,
                                inpainting_fill=args.inpainting_fill)
    return request


def _save_steps(frames, path: Path, text: str) -> None:
    """The denoising process of one image: a GIF and a contact sheet beside it."""
    from plainsd.images import contact_sheet
    from plainsd.pnginfo import save_png

    gif = path.with_name(path.stem + "-steps.gif")
    tmp = gif.with_name("." + gif.name + ".tmp")
    frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:] + [frames[-1]] * 3, duration=150, loop=0)
    tmp.replace(gif)
    sheet = save_png(contact_sheet(frames), path.with_name(path.stem + "-steps.png"), text)
    print(f"{gif}\n{sheet}  (the denoising process, step by step)")


def _hires(args):
    """--hires and its settings as a HiresFix, or None when none of them was given."""
    from plainsd.request import HiresFix

    names = ("scale", "width", "height", "upscaler", "steps", "strength", "sampler", "prompt", "token_merging")
    given = {name: getattr(args, f"hires_{name}", None) for name in names}
    given = {name: value for name, value in given.items() if value is not None}
    if not getattr(args, "hires", False) and not given:
        return None
    return HiresFix(**given)


def _upscale(args) -> int:
    """A1111's Extras upscaling of each picture, written to the output folder as NAME.png with the picture's
    parameters kept and the postprocessing text beside them."""
    import torch

    from plainsd import upscale
    from plainsd.pnginfo import read_parameters, save_png

    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.width is None) != (args.height is None):
        raise ValueError("give both --width and --height (the size to fill), or neither (then --scale)")
    settings = upscale.Extras(upscaler_1=args.upscaler, upscaler_2=args.upscaler_2,
                              upscaler_2_visibility=args.upscaler_2_visibility, resize_mode=int(args.width is not None),
                              upscaling_resize=args.scale, upscaling_resize_w=args.width or 512,
                              upscaling_resize_h=args.height or 512, upscaling_crop=not args.no_crop)
    settings.check(args.upscalers_dir)
    upscale.check_tiling(args.upscaler_tile, args.upscaler_tile_overlap)
    pictures = [(_open_image(path), Path(args.output) / f"{Path(path).stem}.png") for path in args.images]
    inputs = {Path(path).resolve() for path in args.images}
    for _, out in pictures:
        if out.resolve() in inputs:
            raise ValueError(f"{out} would overwrite a picture being upscaled; choose another output folder (-o)")
    for picture, out in pictures:
        started = time.perf_counter()
        result, info = upscale.extras(picture, settings, args.upscalers_dir, tile=args.upscaler_tile,
                                      tile_overlap=args.upscaler_tile_overlap, precision=args.precision,
                                      progress=not args.quiet)
        save_png(result, out, read_parameters(picture), {"postprocessing": upscale.postprocessing_text(info)})
        print(f"{out}  ({picture.width}x{picture.height} -> {result.width}x{result.height}, "
              f"{time.perf_counter() - started:.1f} s)")
    return 0


def _sd_upscale(args) -> int:
    """A1111's SD upscale script on one picture: every tile checked before the model loads, then drawn."""
    import torch

    from plainsd import scripts
    from plainsd.pnginfo import save_png

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.output and Path(args.output).suffix.lower() != ".png":
        raise ValueError(f"the output must be a .png file, got {Path(args.output).name}")
    request = _request(args)
    request.check(backend=args.backend)
    plan = scripts.prepare("sd upscale", "img2img", request, [None, args.overlap, args.upscaler, args.scale])
    engine = _engine(args)
    started = time.perf_counter()
    result = plan(engine, progress=not args.quiet)
    for image, text, path in zip(result.images, result.infotexts, _outputs(args, len(result.images), result.seeds,
                                                                           "sd-upscale")):
        save_png(image, path, text)
        print(f"{path}  ({image.width}x{image.height})")
    print(f"{len(result.images)} image(s) in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def _png_info(args) -> int:
    from plainsd.pnginfo import parse_infotext, read_parameters

    text = read_parameters(_open_image(args.image))
    if not text:
        print(f"{args.image} holds no generation parameters", file=sys.stderr)
        return 1
    print(json.dumps(parse_infotext(text), indent=2, ensure_ascii=False) if args.json else text)
    return 0


def _caption(args) -> int:
    import torch

    from plainsd.captioning import METADATA, caption_folder, folder_images, load_captioner

    folder_images(args.folder)  # no such folder, or no pictures in it: said before a captioner is loaded
    if args.threads:
        torch.set_num_threads(args.threads)
    captioner = load_captioner(args.captioner, args.precision)
    done = caption_folder(args.folder, captioner, args.format, args.prefix, args.suffix, args.overwrite,
                          progress=not args.quiet)
    where = done.metadata if done.metadata else f"{len(done.written)} .txt files in {args.folder}"
    print(f"captioned {len(done.written)} picture(s) with the {captioner.name} captioner into {where}"
          + (f"; skipped {done.skipped} that already had a caption (--overwrite captions them again)"
             if done.skipped else ""))
    if args.format == "txt" and (Path(args.folder) / METADATA).is_file():
        print(f"plainsd: note: {args.folder} also holds a {METADATA}, which plainsd finetune reads instead of the "
              ".txt files", file=sys.stderr)
    return 0


def _detect(args) -> int:
    from plainsd import detectors
    from plainsd.pnginfo import save_png

    if Path(args.output).suffix.lower() != ".png":
        raise ValueError(f"the output must be a .png file, got {Path(args.output).name}")
    if (args.width is None) != (args.height is None):
        raise ValueError("give both --width and --height, or neither")
    if args.module == "openpose_json":
        if args.resolution or args.threshold_a is not None or args.threshold_b is not None or args.pixel_perfect:
            raise ValueError("openpose_json draws the pose at --width x --height (default: the JSON's canvas); "
                             "it takes no resolution, thresholds or pixel perfect")
        try:
            text = Path(args.image).read_text()
        except FileNotFoundError:
            raise ValueError(f"no such pose file: {args.image}") from None
        hint = detectors.openpose_json(text, args.width, args.height)
    else:
        if (args.pixel_perfect or args.resize_mode is not None) and args.width is None:
            raise ValueError("--pixel-perfect and --resize-mode need --width and --height: the size the hint is for")
        resize = args.resize_mode or "Crop and Resize"
        detectors.check(args.module, args.threshold_a, args.threshold_b)  # before the picture is read
        image = _open_image(args.image)
        resolution = 512 if args.resolution is None else args.resolution
        if args.pixel_perfect:
            resolution = detectors.pixel_perfect_resolution(image, args.width, args.height, resize)
        hint = detectors.detect(args.module, image, resolution, args.threshold_a, args.threshold_b)
        if args.width is not None:
            hint = detectors.fit(hint, args.width, args.height, resize)
    path = save_png(hint, args.output, None)
    print(f"{path}  ({hint.width}x{hint.height})")
    return 0


def _samplers(args) -> int:
    from plainsd.diffusion.samplers import SAMPLERS
    from plainsd.diffusion.schedules import SCHEDULE_LABELS

    width = max(len(n) for n in SAMPLERS)
    for name, info in SAMPLERS.items():
        print(f"{name:{width}}  default schedule: {info.schedule:12}  aliases: {', '.join(info.aliases)}")
    print("\nschedules: " + ", ".join(SCHEDULE_LABELS))
    return 0


def _demo(args) -> int:
    from plainsd import pipeline
    from plainsd.pnginfo import save_png
    from plainsd.weights import DEFAULT_MODEL

    engine = _load_model(None, None)
    prompt = "a red circle on the left, on a blue background"
    started = time.perf_counter()
    result = pipeline.txt2img(engine, prompt, seed=1, progress=True)
    seconds = time.perf_counter() - started
    path = save_png(result.images[0], args.output, result.infotexts[0])
    which = "the default model" if DEFAULT_MODEL.is_file() else "a random tiny model (no default model is shipped yet)"
    p = result.parameters
    print(f"drew {prompt!r} with {which}: {p.steps} steps of {p.sampler}, {seconds:.1f} s "
          f"(its recommended settings; prompt as run: {p.prompt!r})\nthe image is at {path.resolve()}")
    upscaled = _demo_upscale(result.images[0], result.infotexts[0], path)
    if upscaled is not None:
        print(f"upscaled x4 by the shipped upscaler plainsd-x4 (as Extras does): {upscaled.resolve()}")
    return 0


def _demo_upscale(image, infotext: str, path: Path) -> Path | None:
    """The demo's picture upscaled 4x by plainsd-x4 into NAME-x4.png, as A1111's Extras writes it; None when the
    upscale extra (spandrel) or the shipped upscaler is missing."""
    import importlib.util

    from plainsd import upscale
    from plainsd.pnginfo import save_png

    if not upscale.SHIPPED.is_file():
        return None
    if importlib.util.find_spec("spandrel") is None:
        print("plainsd: note: install the upscale extra (pip install 'plainsd[upscale]') for the 4x upscale")
        return None
    big, info = upscale.extras(image, upscale.Extras(upscaler_1="plainsd-x4", upscaling_resize=4))
    texts = {"postprocessing": upscale.postprocessing_text(info)}
    return save_png(big, path.with_name(f"{path.stem}-x4.png"), infotext, texts)


def _finetune(args) -> int:
    import dataclasses

    import torch

    from plainsd.train import dist
    from plainsd.train.finetune import finetune, settings
    from plainsd.train.loop import TrainConfig

    recipes = Path(__file__).parent / "data" / "recipes"
    config = args.config or str(recipes / f"finetune-{args.method}.json")
    if not Path(config).exists() and (recipes / f"{config}.json").is_file():  # a shipped recipe's name
        config = str(recipes / f"{config}.json")
    cfg = TrainConfig.from_file(config, out=args.out, steps=args.max_train_steps, lr=args.learning_rate,
                                lr_schedule=args.lr_schedule, lr_cycles=args.lr_cycles, batch_size=args.batch_size,
                                sample_every=args.sample_every, checkpoint_every=args.checkpoint_every)
    if cfg.network != args.method:
        raise ValueError(f"{config} is a {cfg.network} config, not a {args.method} one")
    extra = dict(cfg.extra)
    if args.data:  # the user's own images: their captions, not the recipe's instance prompt
        extra.pop("instance_prompt", None)
    for key, value in [("model", args.model), ("instance_prompt", args.instance_prompt),
                       ("class_prompts", args.class_prompt), ("num_class_images", args.num_class_images),
                       ("prior_weight", args.prior_weight), ("train_text_encoder", args.train_text_encoder),
                       ("token", args.token), ("init_word", args.init_word), ("vectors", args.vectors),
                       ("rank", args.rank), ("alpha", args.alpha), ("validation_prompts", args.validation_prompt)]:
        if value is not None:
            extra[key] = value
    data = {"kind": "folder", "path": args.data} if args.data else cfg.data
    cfg = dataclasses.replace(cfg, extra=extra, data=data)
    settings(cfg)  # unknown settings are reported before anything is loaded
    if args.threads:
        torch.set_num_threads(args.threads)
    with dist.group():  # one process, or one of torchrun's
        result = finetune(cfg, resume=args.resume, progress=not args.quiet)
        if dist.is_main():
            print(f"{args.method}: {result['step']} steps in {result['seconds']:.0f} s; "
                  f"{_loss_trend(result['losses'])}; wrote {result['output']}")
    return 0


def _lora(args) -> int:
    import torch

    import plainsd
    from plainsd import lora

    out = Path(args.output)
    if out.suffix != ".safetensors":
        raise ValueError(f"the merged checkpoint must be a .safetensors file, got {out.name}")
    adapter = lora.read_lora(args.lora)
    sd = plainsd.load(args.base)
    lora.merge(sd, adapter, args.weight)
    plainsd.save(sd, out, dtype=torch.float16 if args.half else None)
    print(f"merged {Path(args.lora).name} ({len(adapter.layers)} layers) at weight {args.weight} into "
          f"{Path(args.base).name}: {out}")
    return 0


def _merge(args) -> int:
    from plainsd.merge import merge_files

    need = {"weighted-sum": 2, "add-difference": 3, "none": 1}[args.method]
    if len(args.models) != need:
        raise ValueError(f"--method {args.method} takes {need} model file(s) (A{', B' if need > 1 else ''}"
                         f"{', C' if need > 2 else ''}), got {len(args.models)}")
    out = merge_files(*args.models, output=args.output, method=args.method, multiplier=args.multiplier,
                      half=args.half, vae=args.vae, discard=args.discard)
    print(out)
    return 0


def _convert(args) -> int:
    from plainsd.convert import CheckFailed, convert

    try:
        result = convert(args.input, args.output, dtype=args.dtype, check=args.check, ema=args.ema,
                         overwrite=args.overwrite)
    except CheckFailed as e:
        print(f"plainsd: check failed: {e}", file=sys.stderr)
        return 1
    print(result.describe())
    return 0


def _serve(args) -> int:
    import torch

    try:
        import uvicorn

        from plainsd.server import Limits, create_app
    except ImportError as e:
        raise ValueError(f"plainsd serve needs FastAPI and uvicorn ({e}); install them with: "
                         "pip install 'plainsd[serve]'") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    limits = Limits(max_size=args.max_size, max_steps=args.max_steps, max_images=args.max_images)
    app = create_app(args.model, args.models_dir, auth=args.api_auth, max_queue=args.max_queue, limits=limits,
                     outputs=args.outputs, lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir,
                     precision=args.precision, backend=args.backend, styles=args.styles,
                     controlnet_dir=args.controlnet_dir, upscalers_dir=args.upscalers_dir, vae_dir=args.vae_dir,
                     captioner=args.captioner)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"plainsd: note: listening on {args.host}, reachable from other machines"
              + ("" if args.api_auth else " without authentication (see --api-auth)"), file=sys.stderr)
    print(f"plainsd: serving {app.state.store.current.title} at http://{args.host}:{args.port}/ "
          f"(API: /sdapi/v1/..., docs: /docs)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _batch(args) -> int:
    from plainsd.batch import MANIFEST, BatchError, run_batch

    started = time.perf_counter()
    try:
        summary = run_batch(args.requests, args.output, model=args.model, workers=args.workers, threads=args.threads,
                            ray=args.ray, precision=args.precision, backend=args.backend, lora_dir=args.lora_dir,
                            embeddings_dir=args.embeddings_dir, styles=args.styles,
                            controlnet_dir=args.controlnet_dir, upscalers_dir=args.upscalers_dir,
                            progress=not args.quiet)
    except BatchError as e:
        if args.debug:
            raise
        print(f"plainsd: error: {e}", file=sys.stderr)
        return 1
    manifest = Path(args.output) / MANIFEST
    if not summary.drawn and not summary.failed:
        print(f"nothing to do: all {summary.requests} request(s) are in {manifest}")
        return 0
    print(f"drew {summary.drawn} request(s), {summary.pictures} picture(s), in {time.perf_counter() - started:.1f} s "
          f"into {args.output}; {summary.skipped} skipped (already in {manifest})"
          + (f"; {summary.resent} sent again after a worker died" if summary.resent else ""))
    if summary.failed:
        raise ValueError(f"{len(summary.failed)} request(s) could not be drawn ({summary.failed[0]}); the others are "
                         f"written, and a rerun tries these again")
    return 0


def _train(args) -> int:
    import torch

    from plainsd.train import dist
    from plainsd.train.loop import TrainConfig
    from plainsd.train.recipes import RECIPES, settings

    recipes = Path(__file__).parent / "data" / "recipes"
    if args.hint and args.network != "controlnet":
        raise ValueError("--hint is for `plainsd train controlnet` only (the preprocessor its hints are made with)")
    default = "controlnet-canny" if args.network == "controlnet" else args.network
    config = args.config or str(recipes / f"{default}.json")
    if not Path(config).exists() and (recipes / f"{config}.json").is_file():  # a shipped recipe's name
        config = str(recipes / f"{config}.json")
    cfg = TrainConfig.from_file(config, out=args.out, steps=args.steps)
    if cfg.network != args.network:
        raise ValueError(f"{config} is a {cfg.network} config, not a {args.network} one")
    if args.hint:
        cfg.extra = {**cfg.extra, "hint": args.hint}
    settings(cfg)  # unknown or misspelt settings are reported before anything is loaded
    if args.threads:
        torch.set_num_threads(args.threads)
    with dist.group():  # one process, or one of torchrun's
        result = RECIPES[args.network](cfg, resume=args.resume, progress=not args.quiet)
        if dist.is_main():
            print(f"trained {args.network} to step {result['step']} in {result['seconds']:.0f} s; "
                  f"{_loss_trend(result['losses'])}; run folder {cfg.out}")
    return 0


def _loss_trend(losses: list[float], n: int = 20) -> str:
    """First and last n steps' mean loss (one step's loss is noise: each draws its own timesteps)."""
    k = min(n, max(len(losses) // 2, 1))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return f"loss {first:.4f} -> {last:.4f} (means of the first and last {k} steps)"


def _eval(args) -> int:
    import torch

    from plainsd import pipeline
    from plainsd.eval import metrics

    out: dict = {}
    if args.taesd and not args.vae:
        raise ValueError("--taesd needs --vae: the VAE (or whole checkpoint) whose encoder feeds the tiny decoder")
    if args.vae:
        from plainsd.train.recipes import load_vae
        vae, scale = load_vae(args.vae)
        out["vae_psnr_db"] = round(metrics.vae_psnr(vae), 2)
        out["vae_roundtrip_adherence"] = metrics.vae_roundtrip_adherence(vae, n=args.prompts or 100)
        if args.taesd:
            from plainsd.weights import load_tiny_decoder
            out["taesd_roundtrip_adherence"] = metrics.vae_roundtrip_adherence(
                vae, n=args.prompts or 100, tiny_decoder=load_tiny_decoder(args.taesd), scale_factor=scale)
    clip = None
    if args.clip:
        from plainsd.models.tokenizer import Tokenizer
        from plainsd.train.recipes import load_clip
        text, vision, _ = load_clip(args.clip)
        clip = (text, vision, Tokenizer("sd1"))
        out["clip_top1_retrieval"] = metrics.clip_retrieval(*clip)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = None
    if args.prompts or args.two_object_prompts:
        engine = _load_model(args.model, None, args.precision, args.backend)
        common = dict(steps=args.steps, cfg_scale=args.cfg_scale, sampler=args.sampler, schedule=args.schedule,
                      guidance_until=args.guidance_until)
        with torch.no_grad():
            if args.prompts:
                pairs: list = []
                out["single_object"] = metrics.adherence(engine, args.prompts, 1, keep_images=pairs, fast=args.fast, **common)
                if clip:
                    out["single_object"].update(metrics.distribution_metrics(pairs, *clip))
            if args.two_object_prompts:
                out["two_objects"] = metrics.adherence(engine, args.two_object_prompts, 2, fast=args.fast, **common)
    if args.checks or args.concept_prompt:
        engine = engine or _load_model(args.model, None, args.precision, args.backend)
        common = dict(steps=args.steps, cfg_scale=args.cfg_scale, sampler=args.sampler, schedule=args.schedule,
                      guidance_until=args.guidance_until)
        with torch.no_grad():
            if args.checks:
                n = max(args.prompts // 2, 10)
                sweep_args = {k: v for k, v in common.items() if k != "cfg_scale"}
                out["cfg_sweep_colour_and_shape"] = metrics.guidance_sweep(engine, n=n, **sweep_args)
                out["negative_prompt"] = metrics.negative_prompt_effect(engine, n=n, **common)
                out["img2img_0.3_keeps"] = metrics.img2img_keeps(engine, n=n, **common)
            if args.concept_prompt:
                out["concept"] = {"prompt": args.concept_prompt, "shape": args.concept_shape,
                                  "rate": metrics.concept_rate(engine, args.concept_prompt, args.concept_shape,
                                                               n=args.concept_images, lora_dir=args.lora_dir,
                                                               embeddings_dir=args.embeddings_dir, **common)}
    if args.prompts or args.two_object_prompts or args.checks or args.concept_prompt:
        used = args.guidance_until
        if used is None:
            used = pipeline.recommended(engine, args.sampler)["guidance_until"]
        out["settings"] = {**common, "guidance_until": used, "model": engine.sd.name,
                           "precision": str(engine.sd.dtype).replace("torch.", ""), "backend": args.backend, "fast": args.fast}
    text = json.dumps(out, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from plainsd.weights import CheckpointError

    handlers = {"txt2img": _generate, "img2img": _generate, "inpaint": _generate, "outpaint": _generate, "xyz": _xyz,
                "png-info": _png_info, "detect": _detect, "upscale": _upscale, "sd-upscale": _sd_upscale,
                "samplers": _samplers, "demo": _demo, "train": _train, "eval": _eval, "serve": _serve, "batch": _batch,
                "lora": _lora, "merge": _merge, "convert": _convert, "finetune": _finetune, "caption": _caption}
    try:
        return handlers[args.command](args)
    except (ValueError, TypeError, CheckpointError, OSError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"plainsd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("plainsd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
