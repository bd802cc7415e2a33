"""What draws a batch's jobs: a Painter holds one loaded model and turns jobs into PNG bytes. The same class
runs in the driver's own process (--workers 1), in local worker processes (here) and as Ray actors
(cluster.py). Workers send the pictures back as bytes and the driver alone writes files, so the output folder
needs to be reachable only from the driver and has one writer."""

from __future__ import annotations

import io
import multiprocessing
import queue as queues
from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image, PngImagePlugin

from plainsd import pipeline, runtime
from plainsd.weights import CheckpointError


class BatchError(RuntimeError):
    """A worker failed in a way that stops the batch (what was drawn is kept; a rerun goes on from there)."""


@dataclass
class Drawn:
    """What a worker sends back for one job: its pictures as PNG files' bytes, or why it could not draw it."""
    line: int
    key: str
    pictures: list[bytes] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    error: str | None = None


def png_bytes(image: Image.Image, parameters: str) -> bytes:
    """A PNG with A1111's parameters chunk, as pnginfo.save_png writes it, in memory."""
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=meta)
    return buffer.getvalue()


class Painter:
    """One worker slot: the model loaded once, prepared to run here, with `threads` torch threads.
    model_sha256: the hash the driver keyed the jobs with; with verify, the file here is checked against it (on
    a cluster each machine reads its own copy of the path)."""

    def __init__(self, model: str, model_sha256: str, precision: str, backend: str = "eager",
                 threads: int | None = None, verify: bool = False):
        import plainsd
        from pathlib import Path

        if threads:
            torch.set_num_threads(threads)
        if verify:
            from .jobs import model_sha256 as sha256_of

            if sha256_of(model) != model_sha256:
                raise CheckpointError(f"{model} on this Ray node is not the model the batch was keyed with "
                                      f"(sha256 {model_sha256[:10]}); give every machine the same file")
        sd = plainsd.load(model, dtype=runtime.choose_dtype(precision))
        if Path(model).is_file():
            sd.hash = model_sha256[:10]  # A1111's short hash in the infotext, as the server writes it
        self.engine = runtime.prepare(sd, backend)

    def draw(self, job) -> Drawn:
        """The job's pictures, or the sentence saying why the pipeline refused it."""
        try:
            result = pipeline.generate(self.engine, job.request)
        except (ValueError, TypeError, OSError) as e:
            return Drawn(job.line, job.key, error=str(e))
        if len(result.images) != len(job.files):
            return Drawn(job.line, job.key, error=f"drew {len(result.images)} pictures, expected {len(job.files)}")
        pictures = [png_bytes(image, text) for image, text in zip(result.images, result.infotexts)]
        return Drawn(job.line, job.key, pictures, list(result.seeds), list(result.infotexts))


def run_here(jobs: list, painter_args: tuple, on_drawn: Callable) -> None:
    """Draw the jobs in this process, one after the other (the torch thread count is restored afterwards)."""
    threads = torch.get_num_threads()
    try:
        painter = Painter(*painter_args)
        for job in jobs:
            on_drawn(job, painter.draw(job))
    finally:
        torch.set_num_threads(threads)


def run_processes(jobs: list, painter_args: tuple, workers: int, on_drawn: Callable) -> None:
    """Draw the jobs in `workers` new processes (spawned: no state inherited from this one), each loading the
    model once and taking jobs from a shared queue as it finishes the last. A worker that stops unexpectedly
    stops the batch; what was drawn is kept, and a rerun goes on from there."""
    context = multiprocessing.get_context("spawn")
    tasks, results = context.Queue(), context.Queue()
    processes = [context.Process(target=_work, args=(painter_args, tasks, results), daemon=True)
                 for _ in range(workers)]
    for p in processes:
        p.start()
    by_key = {job.key: job for job in jobs}
    for job in jobs:
        tasks.put(job)
    for _ in processes:
        tasks.put(None)
    finished = False
    try:
        for _ in jobs:
            kind, value = _next_result(results, processes)
            if kind == "failed":
                raise BatchError(f"a worker could not load the model: {value}")
            on_drawn(by_key[value.key], value)
        finished = True
    finally:
        if not finished:  # (jobs left in the queue are dropped, and the workers stopped)
            tasks.cancel_join_thread()
            for p in processes:
                p.terminate()
        for p in processes:
            p.join()
        for q in (tasks, results):
            q.close()
            q.join_thread()


def _next_result(results, processes) -> tuple:
    """The next thing a worker sends, watching that none has stopped unexpectedly meanwhile."""
    while True:
        try:
            return results.get(timeout=1.0)
        except queues.Empty:
            stopped = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if stopped:
                raise BatchError(f"a worker process stopped unexpectedly (exit code {stopped[0]}); the pictures "
                                 f"drawn so far are kept, and rerunning the batch goes on from there") from None


def _work(painter_args: tuple, tasks, results) -> None:
    """A worker process: load the model, then draw jobs until the None that says there are no more."""
    try:
        painter = Painter(*painter_args)
    except Exception as e:  # (reported by the driver, which stops the batch)
        results.put(("failed", f"{type(e).__name__}: {e}"))
        return
    for job in iter(tasks.get, None):
        results.put(("drawn", painter.draw(job)))
