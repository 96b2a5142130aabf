"""The scheduler: a bounded queue of :class:`Job` objects and one worker thread that owns the runtime and
runs compatible generation jobs as one batch (:meth:`Runtime.generate_batch`).

Usable in-process, without HTTP::

    scheduler = Scheduler(runtime, max_queue=32, max_batch=4, max_wait_s=0.01)
    scheduler.start()
    result = scheduler.submit(Job(kwargs=dict(reference_image=img, prompt="a {S*}", seed=1))).result()
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from profusion_rt.core.errors import ProFusionError
from profusion_rt.models.delta import apply_delta
from profusion_rt.serve.errors import QueueFullError, RequestTimeoutError, ShuttingDownError
from profusion_rt.serve.metrics import Metrics

logger = logging.getLogger(__name__)

__all__ = ["GenerationResult", "Job", "Scheduler", "SAMPLING_FIELDS"]

#: the request fields that must be equal for requests to share a runtime batch
SAMPLING_FIELDS = ("num_inference_steps", "guidance_scale", "reference_guidance_scale", "fusion_steps",
                   "fusion_guidance_scale", "fusion_eta", "fusion_embedding_scale")


@dataclass
class GenerationResult:
    images: list  # PIL images
    seeds: list[int]
    batch_images: int  # images in the runtime batch this request ran in
    batch_requests: int
    queue_s: float
    swap_s: float
    prepare_s: float
    loop_s: float
    decode_s: float


@dataclass(eq=False)
class Job:
    """One unit of work for the worker: a generation (``kwargs`` for :meth:`Runtime.generate_batch`) or a
    ``task`` (a function run alone on the worker thread, e.g. encoding a subject's reference image)."""

    kwargs: dict[str, Any] | None = None
    task: Callable[[], Any] | None = None
    images: int = 1
    delta_key: str | None = None  # subject id whose delta must be applied; None = the base weights
    delta: Any = None  # the loaded Delta for delta_key
    deadline: float = math.inf  # time.monotonic() after which the job is not started any more
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def batch_key(self) -> tuple:
        kw = self.kwargs or {}
        return (self.delta_key,) + tuple(kw.get(name) for name in SAMPLING_FIELDS)


class Scheduler:
    """Owns a runtime on one worker thread; batches compatible generation jobs.

    Jobs batch together when they have the same subject delta and the same sampling parameters (what
    :meth:`Runtime.generate_batch` needs to run them in one loop); prompts, seeds and reference images may
    differ. The worker tracks which delta the runtime's weights carry and swaps (``runtime.apply_delta``)
    only when the next batch needs another one; ``base_delta`` (the base model's values, taken before any
    delta was applied) swaps back. Usable in-process too: ``submit(Job(kwargs=...))`` returns a future.
    """

    def __init__(self, runtime, max_queue: int = 32, max_batch: int = 4, max_wait_s: float = 0.01,
                 base_delta=None, metrics: Metrics | None = None):
        self.runtime = runtime
        self.max_queue, self.max_batch, self.max_wait_s = max_queue, max_batch, max_wait_s
        self.base_delta = base_delta
        self.metrics = metrics or Metrics(lambda: self.depth, getattr(runtime, "device", None))
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._paused = 0
        self._stopping = False
        self._current: str | None = None  # subject id whose delta the weights carry (None: base)
        self._thread: threading.Thread | None = None

    # -- control ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="profusion-serve-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 60.0) -> None:
        """Finish the running batch, fail what is queued (503) and put the base weights back."""
        with self._cond:
            self._stopping = True
            left = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in left:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ShuttingDownError("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._current is not None and self.base_delta is not None:
            self.runtime.apply_delta(self.base_delta)
            self._current = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        """While inside, the worker starts no new batch (jobs still queue up to ``max_queue``): for
        maintenance, and for tests that need a deterministic queue."""
        with self._cond:
            self._paused += 1
        try:
            yield
        finally:
            with self._cond:
                self._paused -= 1
                self._cond.notify_all()

    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def current_subject(self) -> str | None:
        return self._current

    def submit(self, job: Job) -> Future:
        """Queue a job; :class:`QueueFullError` if ``max_queue`` jobs are waiting already."""
        with self._cond:
            if self._stopping:
                raise ShuttingDownError("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                self.metrics.rejected.inc()
                raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting); retry later")
            job.enqueued = time.monotonic()
            self._pending.append(job)
            self._cond.notify_all()
        return job.future

    def cancel(self, job: Job) -> bool:
        """Drop a job that has not started; True if it was dropped."""
        with self._cond:
            try:
                self._pending.remove(job)
            except ValueError:
                pass
        return job.future.cancel()

    # -- the worker ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while (not self._pending or self._paused) and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                batch = [self._pending.popleft()]
                if batch[0].task is None:
                    self._collect(batch)
            try:
                self._execute(batch)
            except BaseException:  # a bug: never leave a handler waiting, keep serving
                logger.exception("worker failed on a batch of %d job(s)", len(batch))
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(ProFusionError("internal error in the worker"))

    def _collect(self, batch: list[Job]) -> None:
        """Add compatible queued jobs to ``batch`` (lock held) until it is full or ``max_wait_s`` passed."""
        key, size = batch[0].batch_key, batch[0].images
        deadline = time.monotonic() + self.max_wait_s
        while True:
            for job in list(self._pending):
                if size >= self.max_batch:
                    break
                if job.task is None and job.batch_key == key and size + job.images <= self.max_batch:
                    self._pending.remove(job)
                    batch.append(job)
                    size += job.images
            remaining = deadline - time.monotonic()
            if size >= self.max_batch or remaining <= 0 or self._stopping:
                return
            self._cond.wait(remaining)

    def _execute(self, batch: list[Job]) -> None:
        now = time.monotonic()
        live = []
        for job in batch:
            if not job.future.set_running_or_notify_cancel():
                continue  # cancelled while queued (client gone or handler timed out)
            if now > job.deadline:
                self.metrics.failed.inc(1, "RequestTimeoutError")
                job.future.set_exception(RequestTimeoutError("the request timed out in the queue"))
                continue
            live.append(job)
        if not live:
            return
        if live[0].task is not None:
            job = live[0]
            try:
                job.future.set_result(job.task())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting handler
                self.metrics.failed.inc(1, type(exc).__name__)
                job.future.set_exception(exc)
            return
        for job in live:
            self.metrics.queue_wait.observe(now - job.enqueued)
        try:
            swap_s = self._ensure_delta(live[0])
            outputs = self.runtime.generate_batch([job.kwargs for job in live])
        except ProFusionError as exc:
            if len(live) > 1:  # one bad request must not fail the others: run them one by one
                logger.info("batch of %d failed (%s); running its requests one by one", len(live), exc)
                for job in live:
                    self._run_alone(job, now)
                return
            self.metrics.failed.inc(1, type(exc).__name__)
            live[0].future.set_exception(exc)
            return
        except Exception as exc:
            logger.exception("runtime failed on a batch of %d request(s)", len(live))
            for job in live:
                self.metrics.failed.inc(1, type(exc).__name__)
                job.future.set_exception(ProFusionError(f"internal error: {type(exc).__name__}"))
            return
        self._finish(live, outputs, now, swap_s)

    def _run_alone(self, job: Job, now: float) -> None:
        try:
            swap_s = self._ensure_delta(job)
            outputs = self.runtime.generate_batch([job.kwargs])
        except Exception as exc:  # noqa: BLE001 - handed to the waiting handler
            if not isinstance(exc, ProFusionError):
                logger.exception("runtime failed on a request")
                exc = ProFusionError(f"internal error: {type(exc).__name__}")
            self.metrics.failed.inc(1, type(exc).__name__)
            job.future.set_exception(exc)
            return
        self._finish([job], outputs, now, swap_s)

    def _finish(self, jobs: list[Job], outputs, started: float, swap_s: float) -> None:
        t = self.runtime.last_timings
        images = sum(len(o.seeds) for o in outputs)
        self.metrics.batch_size.observe(images)
        self.metrics.batch_requests.observe(len(jobs))
        self.metrics.images.inc(images)
        for stage, seconds in (("swap", swap_s), ("prepare", t.prepare_s), ("loop", t.loop_s),
                               ("decode", t.decode_s)):
            self.metrics.stage_seconds.inc(seconds, stage)
        for job, out in zip(jobs, outputs):
            job.future.set_result(GenerationResult(
                images=list(out.images), seeds=list(out.seeds), batch_images=images, batch_requests=len(jobs),
                queue_s=started - job.enqueued, swap_s=swap_s, prepare_s=t.prepare_s, loop_s=t.loop_s,
                decode_s=t.decode_s))
        logger.debug("batch: %d request(s), %d image(s), %.0f ms", len(jobs), images, 1000 * (t.total_s + swap_s))

    def _ensure_delta(self, job: Job) -> float:
        """Make the weights carry ``job``'s subject delta (or the base's); the seconds the swap took."""
        if job.delta_key == self._current:
            return 0.0
        delta = self.base_delta if job.delta_key is None else job.delta
        if delta is None:
            raise ProFusionError("no delta to swap in (the server was built without a base delta)")
        self._current = "<unknown>"  # if the swap fails half way, the next batch swaps again
        seconds = self.runtime.apply_delta(delta)
        self._current = job.delta_key
        self.metrics.delta_swaps.inc()
        return seconds

    def base_pipeline_copy(self):
        """A deep copy of the runtime's pipeline with the base weights. Run it as a task (on the worker), so
        that no delta swap happens while the weights are copied."""
        pipe = copy.deepcopy(self.runtime.pipe)
        if self._current is not None:
            apply_delta(pipe, self.base_delta, base_fingerprint=self.base_delta.base_fingerprint)
        return pipe

