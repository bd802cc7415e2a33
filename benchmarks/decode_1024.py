"""Peak memory and time of a 1024x1024 decode by tiles with an SD1.5-size VAE in the default precision.

    .venv/bin/python benchmarks/decode_1024.py      # after benchmarks/speed.py has written its random checkpoint
"""

import time
from pathlib import Path

import torch

import plainsd
from plainsd import pipeline, runtime

ROOT = Path(__file__).resolve().parent.parent


def peak_gib() -> float:
    return [int(line.split()[1]) / 2**20 for line in Path("/proc/self/status").read_text().splitlines()
            if line.startswith("VmHWM")][0]


def main():
    sd = runtime.prepare(plainsd.load(ROOT / "benchmarks" / ".cache" / "sd15-random.safetensors",
                                      dtype=runtime.choose_dtype("auto"))).sd
    print(f"after loading SD1.5 ({sd.dtype}): peak RSS {peak_gib():.2f} GiB")
    latents = torch.randn(1, 4, 128, 128) * sd.config.scale_factor
    started = time.perf_counter()
    image = pipeline.decode(sd, latents)[0]
    seconds = time.perf_counter() - started
    print(f"{image.width}x{image.height} decode by tiles: {seconds:.1f} s, peak RSS {peak_gib():.2f} GiB")


if __name__ == "__main__":
    main()
