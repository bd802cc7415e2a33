"""The training loop shared by every network: read it top to bottom.

for step in range(start, steps):
    for micro in range(grad_accum): loss = loss_fn(batch(step, micro)) / grad_accum; loss.backward()
    clip gradients; set the learning rate for this step; optimizer.step(); ema.update()
    every sample_every steps: on_sample(step); every checkpoint_every steps: save (atomically)

Batches are a pure function of (seed, step), so a resumed run sees exactly the data it would have seen.
Under torchrun each process computes its rows of every batch and the gradients are averaged (dist.py); only
process 0 writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..weights import write_safetensors
from . import dist

SCHEDULES = ("constant", "cosine", "cosine_with_restarts")
NETWORKS = ("vae", "vae-decoder", "clip", "unet", "taesd", "controlnet", "lcm", "upscaler", "captioner", "dreambooth", "textual-inversion", "lora")  # trainings and fine-tunings


@dataclass
class TrainConfig:
    network: str = "unet"              # vae | clip | unet, or dreambooth | textual-inversion | lora
    steps: int = 1000                  # optimizer steps
    batch_size: int = 32
    grad_accum: int = 1                # micro-batches per optimizer step
    lr: float = 1e-3
    lr_schedule: str = "constant"      # constant | cosine | cosine_with_restarts
    lr_cycles: int = 1                 # cycles of cosine_with_restarts
    warmup: int = 0                    # linear warm-up steps
    weight_decay: float = 0.0          # AdamW's, on matrices and kernels only (not biases, gains, scalars)
    grad_clip: float = 1.0
    ema_decay: float = 0.0             # 0 = no EMA; the EMA weights are what gets exported
    bf16: bool = False                 # bf16 autocast on the CPU
    checkpoint_every: int = 200
    sample_every: int = 0              # 0 = never
    seed: int = 0
    threads: int = 0                   # 0 = torch's default
    out: str = "runs/model"
    model: dict = field(default_factory=dict)   # network config (see the recipes)
    data: dict = field(default_factory=dict)    # {"kind": "shapes", "seed": 0} or {"kind": "folder", "path": ...}
    extra: dict = field(default_factory=dict)   # recipe settings: kl_weight, empty_caption, vae, clip, ...

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "TrainConfig":
        try:
            values = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"no such training config: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}; known: {', '.join(sorted(known))}")
        cfg = cls(**{**values, **{k: v for k, v in overrides.items() if v is not None}})
        cfg.check()
        return cfg

    def check(self):
        if self.network not in NETWORKS:
            raise ValueError(f"network must be one of {', '.join(NETWORKS)}, got {self.network!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; known: {', '.join(SCHEDULES)}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.checkpoint_every < 1:
            raise ValueError("steps, batch_size, grad_accum and checkpoint_every must be at least 1")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at an optimizer step: warm-up, then constant, cosine, or cosine with hard restarts."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if progress >= 1:
        return 0.0
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * ((cfg.lr_cycles * progress) % 1.0)))


class EMA:
    """Exponential moving average of parameters (Polyak averaging), with a warm-up of the decay."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in params.items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in params.items():
            self.shadow[k].lerp_(v.detach().float(), 1 - d)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write a text or binary file whole or not at all, as weights.write_safetensors does for tensors (a temporary
    name, then a rename), so that a run stopped mid-write leaves the last good file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def param_groups(params: dict[str, torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on the matrices and kernels; none on biases, norms' gains and scalars such as CLIP's
    logit scale (decay would pull the temperature and the gains towards zero), as CLIP's training does."""
    decayed = [p for p in params.values() if p.ndim >= 2]
    rest = [p for p in params.values() if p.ndim < 2]
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def save_checkpoint(path: Path, step: int, params: dict, optimizer: torch.optim.Optimizer, ema: EMA | None, info: dict):
    tensors = {f"model.{k}": v for k, v in params.items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.shadow.items()})
    names = {id(p): k for k, p in params.items()}
    scalars = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.ndim > 0:
                    tensors[f"opt.{names[id(p)]}.{key}"] = value
                else:
                    scalars[f"{names[id(p)]}.{key}"] = float(value)
    meta = {"step": step, "ema_updates": ema.updates if ema else 0, "opt_scalars": scalars, **info}
    write_safetensors(tensors, path, {"plainsd.train": json.dumps(meta)})


def load_checkpoint(path: Path, params: dict, optimizer: torch.optim.Optimizer, ema: EMA | None) -> tuple[int, dict]:
    try:
        f = safe_open(str(path), framework="pt")
        meta = json.loads(f.metadata()["plainsd.train"])
    except Exception as e:
        raise ValueError(f"{path} is not a readable plainsd training checkpoint: {e}") from None
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(f.get_tensor(f"model.{k}"))
        if ema is not None:
            for k in ema.shadow:
                ema.shadow[k].copy_(f.get_tensor(f"ema.{k}"))
            ema.updates = meta["ema_updates"]
    for group in optimizer.param_groups:
        members = {id(q) for q in group["params"]}
        for k, p in params.items():
            if id(p) not in members:
                continue
            state = {}
            for key in ("exp_avg", "exp_avg_sq"):
                if f"opt.{k}.{key}" in f.keys():
                    state[key] = f.get_tensor(f"opt.{k}.{key}")
                elif f"{k}.{key}" in meta["opt_scalars"]:  # a 0-dim parameter's moments are stored as numbers
                    state[key] = torch.tensor(meta["opt_scalars"][f"{k}.{key}"], dtype=p.dtype)
            if f"{k}.step" in meta["opt_scalars"]:
                state["step"] = torch.tensor(meta["opt_scalars"][f"{k}.step"])
            if state:
                optimizer.state[p] = state
    return meta["step"], meta


def train(cfg: TrainConfig, params: dict[str, torch.nn.Parameter], loss_fn: Callable[[int, int], torch.Tensor],
          resume: bool = False, on_sample: Callable[[int, dict], None] | None = None,
          on_checkpoint: Callable[[int, dict], None] | None = None, progress: bool = True) -> dict:
    """Run (or continue) a training; returns {"losses": [...], "step": last step, "ema": ema shadow or None}.

    params: the trainable tensors by name; loss_fn(step, micro) -> scalar loss for that micro-batch (under
    torchrun: for this process's rows of it, dist.rows, normalised as the whole micro-batch's mean is).
    on_sample(step, weights) and on_checkpoint(step, weights) get the weights to export (EMA if used).
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist.rows(cfg.batch_size)  # a batch that does not split over the processes is refused before any work
    main = dist.is_main()      # under torchrun, process 0 alone writes files and shows progress
    optimizer = torch.optim.AdamW(param_groups(params, cfg.weight_decay), lr=cfg.lr)
    ema = EMA(params, cfg.ema_decay) if cfg.ema_decay > 0 else None
    ckpt = out / "checkpoint.safetensors"
    start, losses, before = 0, [], 0.0
    if (resume or dist.restarted()) and ckpt.is_file():
        start, meta = load_checkpoint(ckpt, params, optimizer, ema)
        losses, before = meta.get("losses", []), meta.get("seconds", 0.0)
        if dist.restarted() and main:
            print(f"plainsd: restarted by torchrun; going on from the checkpoint of step {start}")
    elif resume and main:
        print(f"plainsd: note: no checkpoint in {out}; starting from step 0")
    if main:
        atomic_write(out / "config.json", json.dumps(asdict(cfg), indent=2))
    parallel = dist.data_parallel(params, loss_fn)

    def export() -> dict[str, torch.Tensor]:
        return ema.shadow if ema is not None else {k: v.detach() for k, v in params.items()}

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not (progress and main),
               desc=cfg.network)
    started = time.perf_counter()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.grad_accum):
            last = micro == cfg.grad_accum - 1  # DDP averages the gradients on the last micro-batch's backward
            with (parallel.no_sync() if parallel and not last else contextlib.nullcontext()):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss = (parallel or loss_fn)(step, micro) / cfg.grad_accum
                loss.backward()
            total += float(loss.detach())
        total = dist.mean(total)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update(params)
        losses.append(total)
        bar.set_postfix(loss=f"{total:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        done = step + 1
        if not main:
            continue
        if on_sample and cfg.sample_every and done % cfg.sample_every == 0:
            on_sample(done, export())
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(ckpt, done, params, optimizer, ema,
                            {"losses": losses, "seconds": before + time.perf_counter() - started})
            if on_checkpoint:
                on_checkpoint(done, export())
    elapsed = time.perf_counter() - started
    return {"losses": losses, "step": cfg.steps, "seconds": elapsed, "total_seconds": before + elapsed,
            "weights": export()}
