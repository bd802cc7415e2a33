"""A batch on a Ray cluster (pip install 'plainsd[ray]'): one actor per worker slot holds the model (a
Painter, workers.py), each job is a task sent to an actor, and the driver collects the pictures as PNG bytes
and writes them itself (output.py), so the output folder needs no sharing and has one writer.

Faults: the driver keeps every job until its pictures are written. When an actor dies (its machine lost, the
process killed, out of memory), the driver starts a new actor in its slot, which Ray places where there is
room, and sends the dead actor's unfinished jobs again; a job whose actors die three times stops the batch.
The driver does this itself (actors have no max_restarts) because it knows which jobs an actor held. An actor
that cannot load the model (or import plainsd) stops the batch at once: its successor would fare no better.
"""

from __future__ import annotations

import uuid
from collections import Counter, deque
from typing import Callable

from .workers import BatchError, Drawn, Painter

MAX_TRIES = 3    # actors that may die under one job before the batch stops
IN_FLIGHT = 2    # jobs sent ahead to each actor, so that it never waits for the driver between two


def run_ray(jobs: list, painter_args: tuple, address: str, workers: int | None, threads: int,
            on_drawn: Callable) -> int:
    """Draw the jobs on the Ray cluster at address ("auto": the one `ray start` runs here, "local": a new one
    for this run, else its address); workers: actors (default: as many as the cluster's CPUs hold at `threads`
    each). Uses the connection a caller already made with ray.init, if any. Returns how many jobs were sent
    again after their actor died."""
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, logging_level="WARNING",
                     **({"include_dashboard": False} if address == "local" else {}))
        except ConnectionError as e:
            raise BatchError(f"cannot reach a Ray cluster at {address!r} ({e}); start one with `ray start --head`, "
                             f"or use --ray local for one of this run only") from None
    pool = None
    try:
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < threads:  # (an actor no machine can hold would wait for ever)
            raise BatchError(f"each actor asks for {threads} CPUs (--threads), and the Ray cluster has {cpus:g}")
        n = workers or max(1, int(cpus // threads))
        pool = _Pool(ray, min(n, len(jobs)), threads, painter_args)
        return pool.run(jobs, on_drawn)
    finally:
        if pool is not None:
            pool.close()
        if started:
            ray.shutdown()


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray; install it with: pip install 'plainsd[ray]'") from None
    return ray


class _Pool:
    """The actors of one batch, one per slot, named plainsd-batch-<run>-<slot>.<generation> (a replaced
    actor's successor has the next generation)."""

    def __init__(self, ray, slots: int, threads: int, painter_args: tuple):
        self.ray, self.painter_args = ray, painter_args
        self.run_id = uuid.uuid4().hex[:8]
        self.painter = ray.remote(Painter)
        self.options = dict(num_cpus=threads, max_restarts=0, max_concurrency=1)
        self.generations = [0] * slots
        self.actors = [self._start(slot) for slot in range(slots)]

    def _start(self, slot: int):
        name = f"plainsd-batch-{self.run_id}-{slot}.{self.generations[slot]}"
        return self.painter.options(**self.options, name=name).remote(*self.painter_args)

    def _replace(self, slot: int) -> None:
        try:
            self.ray.kill(self.actors[slot])
        except Exception:  # (already gone)
            pass
        self.generations[slot] += 1
        self.actors[slot] = self._start(slot)

    def run(self, jobs: list, on_drawn: Callable) -> int:
        """Send jobs to the actors, IN_FLIGHT at a time each, and hand each result to on_drawn(job, drawn) as it
        comes; a job whose actor died goes back to the front of the queue."""
        from ray.exceptions import RayActorError, RayTaskError

        waiting, pending, tries, resent = deque(jobs), {}, Counter(), 0
        load = [0] * len(self.actors)
        while waiting or pending:
            for slot, actor in enumerate(self.actors):
                while load[slot] < IN_FLIGHT and waiting:
                    job = waiting.popleft()
                    pending[actor.draw.remote(job)] = (job, slot, actor)
                    load[slot] += 1
            [ref], _ = self.ray.wait(list(pending), num_returns=1)
            job, slot, actor = pending.pop(ref)
            load[slot] -= 1
            try:
                drawn = self.ray.get(ref)
            except RayActorError as e:
                if e.actor_init_failed:  # (no use trying again: the model or plainsd is missing where it ran)
                    raise BatchError(f"a Ray worker could not load the model: {_last_line(e)}; every machine needs "
                                     f"plainsd and the model at {self.painter_args[0]}") from None
                tries[job.key] += 1
                if tries[job.key] >= MAX_TRIES:
                    raise BatchError(f"line {job.line}: {MAX_TRIES} workers died drawing it (last: {_first_line(e)}); "
                                     f"the pictures drawn so far are kept") from None
                waiting.appendleft(job)
                resent += 1
                if self.actors[slot] is actor:  # (its other jobs fail too, but the slot is replaced once)
                    self._replace(slot)
                continue
            except RayTaskError as e:  # not the pipeline's refusal (that comes back as Drawn.error): a fault
                drawn = Drawn(job.line, job.key, error=_first_line(e))
            on_drawn(job, drawn)
        return resent

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:
                pass


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _last_line(error: Exception) -> str:
    """The exception's own line at the end of a remote traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
