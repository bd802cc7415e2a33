"""The figures of `plainsd convert`'s check when a model's weights are rounded to fp16 and bf16: each output's
largest difference from the float32 model as a fraction of its largest value (text encode, UNet call, VAE decode:
plainsd.convert.probe's fixed inputs), the numbers docs/generation.md ("Managing models: converting") gives
beside the limits in plainsd.convert.TOLERANCE.

    python benchmarks/convert_check.py                 # random SD 1.5-size weights (about 4 GB of RAM, minutes)
    python benchmarks/convert_check.py --model PATH    # a checkpoint file or diffusers folder; "shipped": plainsd's

The weights are rounded in memory: what convert writes and its check loads back holds the same values.
"""

import argparse

import torch

import plainsd
from plainsd.convert import TOLERANCE, compare, probe


def rounded(make, dtype: torch.dtype):
    """A fresh copy of the model with every floating-point weight rounded to dtype and stored as float32 again."""
    sd = make()
    with torch.no_grad():
        for t in [*sd.parameters(), *sd.buffers()]:
            if t.is_floating_point():
                t.copy_(t.to(dtype).float())
    return sd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sd15", help="random weights of this preset (default sd15)")
    parser.add_argument("--model", default=None, help='a checkpoint instead of random weights ("shipped": plainsd\'s)')
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        path = None if args.model == "shipped" else args.model
        make, label = (lambda: plainsd.load(path)), args.model
    else:
        make, label = (lambda: plainsd.build(args.preset, seed=0)), f"random {args.preset}"
    reference, conditioning = probe(make())
    for dtype in (torch.float16, torch.bfloat16):
        figures = compare(reference, probe(rounded(make, dtype), conditioning)[0])
        shown = ", ".join(f"{name} {value:.1e}" for name, value in figures.items())
        print(f"{label} -> {str(dtype).replace('torch.', '')}: {shown} (limit {TOLERANCE[dtype]:.0e})", flush=True)


if __name__ == "__main__":
    main()
