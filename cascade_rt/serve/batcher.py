"""Dynamic batching with admission control, on the server's event loop (docs/serving.md, "Batching", "Overload").

Requests wait in one queue per `BatchKey` (shape and settings). The scheduler takes the key whose oldest request
has waited longest and starts a batch when it holds `max_batch` images or that request has waited `max_wait`
seconds; it takes whole requests, oldest first, up to `max_batch` images. The model runs on worker threads
(`BatchEngine.prior`, then `BatchEngine.decoder`); with `engine.overlap` the prior of the next batch runs while the
decoder of the current one does.

Admission: at most `max_queue` requests wait (`QueueFull` past that: the server answers 429 with Retry-After);
a request whose deadline passes before its batch starts is dropped (`DeadlineExceeded`: 504); a request cancelled
by its client (disconnect) is dropped if it has not started. Each submitted request's future gets exactly one
outcome: its images, or the exception of its batch (a NaN stage output fails that batch only).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cascade_rt.errors import CascadeError
from cascade_rt.serve.engine import BatchEngine, BatchOutput
from cascade_rt.serve.schemas import BatchKey, GenerationSpec

logger = logging.getLogger(__name__)


class QueueFull(CascadeError):
    """The bounded queue is full: retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(CascadeError):
    """The request's deadline passed before its batch started."""


class ShuttingDown(CascadeError):
    """The server is stopping and takes no new work."""


@dataclass
class Job:
    spec: GenerationSpec
    future: asyncio.Future
    deadline: float  # time.monotonic() value
    on_preview: Callable[[list], None] | None = None  # called on the event loop with the request's previews
    enqueued: float = field(default_factory=time.monotonic)
    started: bool = False
    cancelled: bool = False

    def cancel(self) -> None:
        """The client went away or gave up: drop the job if it has not started (its result is ignored if it has)."""
        self.cancelled = True
        if not self.future.done():
            self.future.cancel()


class Batcher:
    def __init__(self, engine: BatchEngine, *, max_batch: int, max_wait: float, max_queue: int,
                 metrics: Any = None) -> None:
        self.engine, self.max_batch, self.max_wait, self.max_queue = engine, max_batch, max_wait, max_queue
        self.metrics = metrics
        self.queues: dict[BatchKey, deque[Job]] = {}
        self.waiting = 0  # jobs in the queues (not started)
        self.running = 0  # jobs in a batch that has started
        self.batches = 0  # model batches run
        self.recent_batch_s = 1.0  # seconds of the last batch: the Retry-After estimate
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task | None = None
        self._decoding: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # one thread per phase: phases of different batches overlap only when the engine says so
        self._prior_pool = ThreadPoolExecutor(1, thread_name_prefix="cascade-rt-prior")
        self._decoder_pool = ThreadPoolExecutor(1, thread_name_prefix="cascade-rt-decoder")

    # ------------------------------------------------------------------------------------------ life cycle
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="cascade-rt-batcher")

    async def stop(self) -> None:
        """Take no new work, finish every queued and running request, then stop the worker threads."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._prior_pool.shutdown(wait=True)
        self._decoder_pool.shutdown(wait=True)

    # ------------------------------------------------------------------------------------------ admission
    def submit(self, spec: GenerationSpec, *, timeout: float,
               on_preview: Callable[[list], None] | None = None) -> Job:
        if self._stopping:
            raise ShuttingDown("the server is shutting down and takes no new requests; retry on another replica")
        if self.waiting >= self.max_queue:
            retry = max(1, round(self.recent_batch_s * (1 + self.waiting / max(self.max_batch, 1))))
            raise QueueFull(f"the queue is full ({self.waiting} requests waiting, limit {self.max_queue}); "
                            f"retry after {retry} s", retry)
        job = Job(spec, asyncio.get_running_loop().create_future(), time.monotonic() + timeout, on_preview)
        self.queues.setdefault(spec.key, deque()).append(job)
        self.waiting += 1
        self._gauge()
        self._wake.set()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a job whose client gave up (disconnect, deadline): out of the queue now if it has not started."""
        job.cancel()
        self._wake.set()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.waiting)
            self.metrics.in_flight.set(self.running)

    def _purge(self) -> None:
        """Drop cancelled jobs and fail the ones whose deadline passed (they never started)."""
        now = time.monotonic()
        for key in list(self.queues):
            kept = deque()
            for job in self.queues[key]:
                if job.cancelled or job.future.done():
                    self.waiting -= 1
                elif now >= job.deadline:
                    self.waiting -= 1
                    job.future.set_exception(DeadlineExceeded(
                        f"the request waited {now - job.enqueued:.1f} s in the queue, past its deadline; it was "
                        "dropped before it started (raise the timeout, or retry later)"))
                else:
                    kept.append(job)
            if kept:
                self.queues[key] = kept
            else:
                del self.queues[key]
        self._gauge()

    # ------------------------------------------------------------------------------------------ scheduling
    def _next_batch(self) -> tuple[list[Job] | None, float | None]:
        """(jobs to run now, None) or (None, seconds to wait before a batch may start; None = until woken)."""
        self._purge()
        if not self.queues:
            return None, None
        key = min(self.queues, key=lambda k: self.queues[k][0].enqueued)
        queue = self.queues[key]
        images = sum(j.spec.n for j in queue)
        wait = queue[0].enqueued + self.max_wait - time.monotonic()
        if images < self.max_batch and wait > 0 and not self._stopping:
            soonest = min(j.deadline for q in self.queues.values() for j in q) - time.monotonic()
            return None, max(0.0, min(wait, soonest))
        jobs, total = [], 0
        while queue and total + queue[0].spec.n <= self.max_batch:
            job = queue.popleft()
            jobs.append(job)
            total += job.spec.n
        if not queue:
            del self.queues[key]
        self.waiting -= len(jobs)
        return jobs, None

    async def _run(self) -> None:
        while True:
            jobs, wait = self._next_batch()
            if jobs is None:
                if self._stopping and not self.queues:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=wait)
                except asyncio.TimeoutError:
                    pass
                continue
            await self._start_batch(jobs)
        if self._decoding is not None:
            await self._decoding

    async def _start_batch(self, jobs: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        for job in jobs:
            job.started = True
        self.running += len(jobs)
        self._gauge()
        specs = [j.spec for j in jobs]
        t0 = time.perf_counter()

        def previews(i: int, images: list) -> None:  # on the prior thread
            if jobs[i].on_preview is not None and not jobs[i].cancelled:
                loop.call_soon_threadsafe(jobs[i].on_preview, images)

        try:
            state = await loop.run_in_executor(self._prior_pool, self.engine.prior, specs, previews)
        except Exception as exc:  # noqa: BLE001 - the batch fails, the server keeps serving
            self._finish(jobs, exc, t0)
            return
        if self._decoding is not None:  # at most one decoder in flight: bounded memory
            await self._decoding
        self._decoding = asyncio.create_task(self._decode(jobs, state, t0))
        if not self.engine.overlap:
            await self._decoding

    async def _decode(self, jobs: list[Job], state: Any, t0: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            out = await loop.run_in_executor(self._decoder_pool, self.engine.decoder, state)
        except Exception as exc:  # noqa: BLE001
            self._finish(jobs, exc, t0)
            return
        self._finish(jobs, out, t0)

    def _finish(self, jobs: list[Job], outcome: BatchOutput | Exception, t0: float) -> None:
        elapsed = time.perf_counter() - t0
        self.batches += 1
        self.running -= len(jobs)
        if isinstance(outcome, Exception):
            logger.error("a batch of %d requests failed: %s", len(jobs), outcome)
        else:
            self.recent_batch_s = elapsed
        if self.metrics is not None:
            self.metrics.observe_batch(sum(j.spec.n for j in jobs), outcome, elapsed)
        for i, job in enumerate(jobs):
            if job.future.done():
                continue  # cancelled by its client, or timed out: nobody waits for it
            if isinstance(outcome, Exception):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome.images[i])
        self._gauge()
