"""What data-parallel training sends between processes each step, and what that costs on a network.

DistributedDataParallel all-reduces the gradient of every trained tensor once per optimizer step. This script
counts the bytes DDP hands to its all-reduce per step (a communication hook sees each bucket) for full UNet
training and for LoRA, on the shipped model and at SD1.5 size, and computes the time a ring all-reduce of that
many bytes takes on 10 and 100 Gbit/s links (each process sends and receives 2 (N-1) / N times the bytes). It
also times one training step of the shipped model's UNet on this machine, for scale.

    .venv/bin/python benchmarks/dist_traffic.py [--out benchmarks/dist_traffic.md]
"""

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

import plainsd
from plainsd import lora
from plainsd.diffusion.denoisers import training_loss
from plainsd.runtime.precision import cpu_flags
from plainsd.train.dist import StepModule

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import cpu_name  # noqa: E402

LINKS = {"10 Gbit/s": 10e9 / 8, "100 Gbit/s": 100e9 / 8}
PROCESSES = (2, 8)


def bytes_per_step(params: dict[str, torch.nn.Parameter]) -> int:
    """The bytes DDP all-reduces in one optimizer step for these trained tensors (counted, not computed)."""
    from torch.nn.parallel import DistributedDataParallel

    sent = []

    def counting(state, bucket):
        sent.append(bucket.buffer().numel() * bucket.buffer().element_size())
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    loss = lambda step, micro: sum((p.float() * 1e-3).sum() for p in params.values())  # noqa: E731 every gradient
    ddp = DistributedDataParallel(StepModule(params, loss))
    ddp.register_comm_hook(None, counting)
    for _ in range(2):  # DDP settles its buckets on the first step; count the second
        sent.clear()
        ddp(0, 0).backward()
    return sum(sent)


def trainings():
    """(name, trained tensors) of each training, one at a time (only those tensors require gradients)."""
    for name, sd in (("shipped model", plainsd.load()), ("SD1.5 size", plainsd.build("sd15", seed=0))):
        sd.requires_grad_(False)
        yield f"{name}: whole UNet", {k: p.requires_grad_(True) for k, p in sd.unet.named_parameters()}
        sd.requires_grad_(False)
        yield f"{name}: LoRA rank 4 (attention)", _adapters(sd, 4, "attention")
        yield f"{name}: LoRA rank 32 (all layers, as LCM-LoRA)", _adapters(sd, 32, "all")


def _adapters(sd, rank: int, targets: str) -> dict:
    adapters = lora.attach(sd, rank=rank, targets=targets)
    params = {f"{k}.{n}": p.requires_grad_(True) for k, a in adapters.items() for n, p in a.named_parameters()}
    lora.detach(adapters)  # only their tensors are counted; the model stays as it was for the next row
    return params


def shipped_step_seconds(batch: int = 32, repeats: int = 3) -> float:
    """One training step (forward and backward) of the shipped UNet at its recipe's batch, float32."""
    sd = plainsd.load().float()
    sd.requires_grad_(False)
    sd.unet.requires_grad_(True)
    f = sd.config.resolution // 8
    x0, context = torch.randn(batch, 4, f, f), torch.randn(batch, 77, sd.config.unet.context_dim)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        training_loss(sd.unet, x0, context, generator=torch.Generator().manual_seed(0)).backward()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def table(rows: list[tuple[str, int]]) -> list[str]:
    head = [f"ring all-reduce, {n} processes, {link}" for n in PROCESSES for link in LINKS]
    lines = ["| training | trained parameters | bytes per step | " + " | ".join(head) + " |",
             "|---|---|---|" + "---|" * len(head)]
    for name, (count, sent) in rows:
        times = [2 * (n - 1) / n * sent / speed for n in PROCESSES for speed in LINKS.values()]
        lines.append(f"| {name} | {count / 1e6:.2f} M | {sent / 1e6:.1f} MB | "
                     + " | ".join(f"{t * 1000:.1f} ms" if t < 1 else f"{t:.2f} s" for t in times) + " |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/dist_traffic.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), 1), rank=0, world_size=1)
        rows = [(name, (sum(p.numel() for p in params.values()), bytes_per_step(params)))
                for name, params in trainings()]
        dist.destroy_process_group()
    step = shipped_step_seconds()
    flags = ", ".join(sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}))
    lines = [f"# Data-parallel traffic per step (`benchmarks/dist_traffic.py`; {cpu_name()} ({flags}), "
             f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads)", "",
             "Bytes counted in DDP's communication hook (float32 gradients); times computed for a ring all-reduce "
             "at the link's full speed.", "", *table(rows), "",
             f"One float32 training step (forward and backward) of the shipped UNet at the unet recipe's batch of "
             f"32 on this machine: {step:.2f} s."]
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
