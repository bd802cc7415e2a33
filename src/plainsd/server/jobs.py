"""One generation at a time, the rest waiting in a bounded first-in first-out queue.

A worker thread takes jobs in order and runs them; HTTP handlers wait on each job's Future. The queue
holds at most `max_queue` waiting jobs; submit() refuses more (the server answers 503). A job whose
client went away is dropped if it is still waiting and interrupted at its next step if it is running.
Progress (step, total, a cheap preview of the current estimate) is readable at any time.
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable


class QueueFull(Exception):
    """The queue already holds its maximum of waiting jobs."""


@dataclass
class Job:
    run: Callable[["Job"], Any]   # does the work; reads job.interrupted / job.take_skip() between steps
    kind: str = "txt2img"
    steps_total: int = 0          # sampling steps over all batches, for the progress fraction
    future: Future = field(default_factory=Future)
    started: float | None = None
    interrupted: bool = False
    skipped: bool = False
    cancelled: bool = False       # its client went away
    step: int = 0                 # steps done over all batches
    batch_step: int = 0           # step within the current batch
    batch_steps: int = 0
    preview: Any = None           # a PIL image of the current estimate, or None

    def interrupt(self):
        self.interrupted = True

    def take_skip(self) -> bool:
        """True once after /skip: the current batch ends, the next one runs."""
        was, self.skipped = self.skipped, False
        return was

    def should_stop(self) -> bool:
        return self.interrupted or self.cancelled


class JobQueue:
    def __init__(self, max_queue: int = 16):
        self.max_queue = max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._lock = threading.Condition()
        self.current: Job | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="plainsd-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Job:
        with self._lock:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting); try again in a little while")
            self._waiting.append(job)
            self._lock.notify()
        return job

    def cancel(self, job: Job):
        """The client went away: drop the job if it waits, stop it at the next step if it runs."""
        with self._lock:
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
                if not job.future.done():
                    job.future.cancel()

    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def close(self):
        with self._lock:
            self._closed = True
            for job in self._waiting:
                job.future.cancel()
            self._waiting.clear()
            if self.current is not None:
                self.current.interrupt()
            self._lock.notify_all()

    def _work(self):
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                job = self._waiting.popleft()
                self.current = job
            job.started = time.time()
            result, error = None, None
            try:
                if not job.future.set_running_or_notify_cancel():
                    continue
                result = job.run(job)
            except BaseException as e:  # the handler turns it into an HTTP answer
                error = e
            finally:
                with self._lock:  # no longer current before its answer goes out: /progress then shows it done
                    self.current = None
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
