"""Cross-request micro-batching: the forward passes of concurrent requests gathered into one.

MLflow's scoring server runs each request's `predict` in a thread of its own (`asyncio.to_thread`), and a
network's forward pass costs nearly the same for 1 image as for 16 on a CPU. Each request prepares its own
images (decoding, resizing, stain) in its thread and hands the batch to `MicroBatcher.submit`; one thread runs
the forward pass of everything handed in since, up to `max_batch` images, and gives each request exactly its
own rows back.

It waits for more only while other requests are known to be on their way (they entered `predict` and have not
handed their batch in yet), and never longer than `max_wait_ms`. A lone request (none other on its way or queued)
runs its forward pass in its own thread: no hand-over to the batcher's (measured: 0.3-0.6 ms a request).
A request that waits longer than `timeout_s` for its rows gets a TimeoutError and its batch is dropped if it
has not run yet; a batch whose forward pass fails fails its own requests only.

Settings: the model's `batching` config at logging time; `HISTOFLOW_MAX_BATCH` and `HISTOFLOW_MAX_WAIT_MS` in
the server's environment override them (0 images: no batching).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

MAX_BATCH_ENV, MAX_WAIT_ENV = "HISTOFLOW_MAX_BATCH", "HISTOFLOW_MAX_WAIT_MS"
# ONNX Runtime's cost per image stops falling at 4-8 images a pass on a CPU (bench/serve_profile.py); a larger
# batch only holds more activations in memory.
DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT_MS = 8, 2.0
DEFAULT_TIMEOUT_S = 60.0  # MLflow's scoring server gives a request 60 s (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT)

# The forward pass of a batch: its key (what must match to share a pass) and images -> arrays with a first axis
# of one row per image.
Forward = Callable[[Hashable, np.ndarray], list[np.ndarray]]


@dataclass(frozen=True)
class BatchingSettings:
    max_batch: int = DEFAULT_MAX_BATCH
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS
    timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def resolve(cls, logged: dict | None = None) -> BatchingSettings:
        """The model's logged settings, then the server's environment over them."""
        values = {**(logged or {})}
        for name, env, kind in (("max_batch", MAX_BATCH_ENV, int), ("max_wait_ms", MAX_WAIT_ENV, float)):
            given = os.environ.get(env, "").strip()
            if given:
                try:
                    values[name] = kind(given)
                except ValueError:
                    raise ValueError(f"{env} must be {'an integer' if kind is int else 'a number'}; "
                                     f"got {given!r}") from None
        settings = cls(**values)
        if settings.max_batch < 0 or settings.max_wait_ms < 0 or settings.timeout_s <= 0:
            raise ValueError(f"batching needs max_batch >= 0, max_wait_ms >= 0 and timeout_s > 0; got {settings}")
        return settings


@dataclass
class _Coming:
    arrived: bool = False


@dataclass
class _Job:
    key: Hashable
    images: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    outputs: list[np.ndarray] | None = None
    error: BaseException | None = None
    abandoned: bool = False


class MicroBatcher:
    """Runs `forward` on the batches of concurrent callers together (see the module's docstring)."""

    def __init__(self, forward: Forward, settings: BatchingSettings = BatchingSettings()) -> None:
        self.forward, self.settings = forward, settings
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._held: list[_Job] = []  # taken from the queue but of another key than the batch being gathered
        self._lock = threading.Lock()
        self._coming = 0  # requests inside `expecting()` that have not submitted yet
        self._queued = 0  # jobs handed to the batcher's thread and not yet answered
        self.passes = self.images = self.largest = 0  # forward passes run, images through them, largest batch
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def expecting(self) -> Iterator[_Coming]:
        """Around a request's preparation: until it submits (or leaves), the batcher waits for it (up to
        max_wait_ms) before running a batch. Pass what it yields to `submit`."""
        coming = _Coming()
        with self._lock:
            self._coming += 1
        try:
            yield coming
        finally:
            self._arrived(coming)

    def _arrived(self, coming: _Coming | None) -> None:
        if coming is None:
            return
        with self._lock:
            if not coming.arrived:
                coming.arrived = True
                self._coming -= 1

    def submit(self, key: Hashable, images: np.ndarray, coming: _Coming | None = None) -> list[np.ndarray]:
        """The forward pass's outputs for these images (one row each), run with whatever else is submitted now.
        `coming`: what `expecting()` yielded to this request (it is no longer waited for once submitted)."""
        self._arrived(coming)
        if self.settings.max_batch == 0 or len(images) >= self.settings.max_batch or not self._queue_up():
            return self._run_alone(key, images)
        job = _Job(key, images)
        self._start()
        self._jobs.put(job)
        if not job.done.wait(self.settings.timeout_s):
            job.abandoned = True  # not run yet: the batcher skips it; running: its rows are thrown away
            raise TimeoutError(f"no forward pass within {self.settings.timeout_s:g} s: the server is overloaded")
        if job.error is not None:
            raise job.error
        return job.outputs

    def _queue_up(self) -> bool:
        """Count a job in for the batcher's thread, unless it would be alone there (nothing queued, no other
        request on its way): then it runs in its caller's thread."""
        with self._lock:
            if self._coming == 0 and self._queued == 0:
                return False
            self._queued += 1
            return True

    def _answered(self, job: _Job) -> None:
        with self._lock:
            self._queued -= 1
        job.done.set()

    def _run_alone(self, key: Hashable, images: np.ndarray) -> list[np.ndarray]:
        outputs = self.forward(key, images)
        with self._lock:
            self.passes, self.images = self.passes + 1, self.images + len(images)
            self.largest = max(self.largest, len(images))
        return outputs

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._loop, name="histoflow-batcher", daemon=True)
                    self._thread.start()

    def _loop(self) -> None:
        while True:
            first = self._held.pop(0) if self._held else self._jobs.get()
            if first.abandoned:
                self._answered(first)  # nobody waits for it any more
                continue
            batch, size = [first], len(first.images)
            deadline = time.perf_counter() + self.settings.max_wait_ms / 1000
            while size < self.settings.max_batch:
                job = self._next(deadline)
                if job is None:
                    break
                if job.abandoned:
                    self._answered(job)
                    continue
                if job.key != first.key or size + len(job.images) > self.settings.max_batch:
                    self._held.append(job)  # the next batch's
                    break
                batch.append(job)
                size += len(job.images)
            self._run(batch)

    def _next(self, deadline: float) -> _Job | None:
        """The next queued job: at once if one is queued, else waiting until the deadline while others are on
        their way; None when there is none to wait for."""
        while True:
            try:
                return self._jobs.get_nowait()
            except queue.Empty:
                pass
            left = deadline - time.perf_counter()
            with self._lock:
                coming = self._coming
            if coming == 0 or left <= 0:
                return None
            try:
                return self._jobs.get(timeout=min(left, 0.0005))
            except queue.Empty:
                continue

    def _run(self, batch: list[_Job]) -> None:
        try:
            outputs = self._run_alone(batch[0].key, np.concatenate([job.images for job in batch]))
        except Exception as exc:  # handed to the requests of this batch; the batcher goes on
            log.exception("a batched forward pass failed (%d requests)", len(batch))
            for job in batch:
                job.error = exc
                self._answered(job)
            return
        start = 0
        for job in batch:
            stop = start + len(job.images)
            job.outputs = [output[start:stop] for output in outputs]
            self._answered(job)
            start = stop
