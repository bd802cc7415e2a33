"""Bulk generation: `plainsd batch requests.jsonl -o OUT`, one A1111 txt2img or img2img request per line.

    summary = run_batch("requests.jsonl", "out", workers=2)             # two local worker processes
    summary = run_batch("requests.jsonl", "out", ray="auto")            # the Ray cluster started here

Each line is mapped as the server maps a request (jobs.py) and checked before anything is drawn. Each picture
is written whole with its PNG parameters, and each request gets a line in OUT/manifest.jsonl once its pictures
are there (output.py). A request already in the manifest (the same request, model, precision and backend) is
skipped, so a stopped batch can be run again and draws only what is missing. Workers: the driver's own process,
local processes or Ray actors (workers.py, cluster.py), each loading the model once.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .jobs import Job, Setup, model_sha256, read_jobs
from .output import MANIFEST, done, record
from .workers import BatchError, Drawn

__all__ = ["run_batch", "Summary", "Job", "Setup", "Drawn", "BatchError", "read_jobs", "MANIFEST"]


@dataclass
class Summary:
    requests: int = 0             # non-blank lines of the file
    skipped: int = 0              # already drawn by an earlier run
    drawn: int = 0                # requests drawn by this run
    pictures: int = 0
    failed: list[str] = field(default_factory=list)   # "line N: why" for each request the pipeline refused
    resent: int = 0               # jobs sent again after their Ray actor died


def run_batch(requests: str | Path, out: str | Path, *, model: str | Path | None = None, workers: int | None = None,
              threads: int | None = None, ray: str | None = None, precision: str = "auto", backend: str = "eager",
              lora_dir: str | None = None, embeddings_dir: str | None = None, styles: str | None = None,
              controlnet_dir: str | None = None, upscalers_dir: str | None = None, progress: bool = True,
              on_drawn: Callable[[dict], None] | None = None) -> Summary:
    """Draw every request of the file not yet in out/manifest.jsonl. model: a checkpoint (default: the shipped
    model); workers: processes (1: this one; default 1) or, with ray, actors (default: as many as the cluster's
    CPUs hold); threads: torch threads per worker (default: the cores shared out, 1 on Ray); ray: "auto",
    "local" or a cluster address. on_drawn(manifest entry) after each request is written. A bad line raises
    ValueError naming it before anything is written."""
    from plainsd.runtime import choose_dtype
    from plainsd.weights import DEFAULT_MODEL

    model = str(model if model is not None else DEFAULT_MODEL)
    if not Path(model).exists():
        raise ValueError(f"no such model file or folder: {model}")
    if workers is not None and workers < 1 or threads is not None and threads < 1:
        raise ValueError("--workers and --threads must be at least 1")
    dtype = choose_dtype(precision)  # chosen once here, so that every worker draws alike
    setup = Setup(model, model_sha256(model), "bf16" if str(dtype) == "torch.bfloat16" else "fp32", backend,
                  lora_dir, embeddings_dir, styles, controlnet_dir, upscalers_dir)
    jobs = read_jobs(requests, setup)
    finished = done(out)
    todo = [job for job in jobs if job.key not in finished]
    summary = Summary(requests=len(jobs), skipped=len(jobs) - len(todo))
    if todo:
        Path(out).mkdir(parents=True, exist_ok=True)
        _draw(todo, setup, Path(out), summary, workers, threads, ray, progress, on_drawn)
    return summary


def _draw(todo: list[Job], setup: Setup, out: Path, summary: Summary, workers, threads, ray, progress: bool,
          on_drawn) -> None:
    """Draw the jobs with the workers asked for, writing each request's pictures and manifest line as it comes."""
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="request", disable=not progress, file=sys.stderr)

    def write(job: Job, drawn: Drawn) -> None:
        if drawn.error is not None:
            summary.failed.append(f"line {job.line}: {drawn.error}")
            bar.write(f"plainsd: line {job.line}: {drawn.error}", file=sys.stderr)
        else:
            entry = record(out, job, drawn)
            summary.drawn += 1
            summary.pictures += len(drawn.pictures)
            if on_drawn is not None:
                on_drawn(entry)
        bar.update(1)

    try:
        if ray is not None:
            from .cluster import run_ray

            args = (setup.model, setup.model_sha256, setup.precision, setup.backend, threads or 1, True)
            summary.resent = run_ray(todo, args, ray, workers, threads or 1, write)
            return
        workers = min(workers or 1, len(todo))
        threads = threads or (max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None)
        args = (setup.model, setup.model_sha256, setup.precision, setup.backend, threads)
        if workers == 1:
            from .workers import run_here
            run_here(todo, args, write)
        else:
            from .workers import run_processes
            run_processes(todo, args, workers, write)
    finally:
        bar.close()
