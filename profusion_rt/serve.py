"""HTTP serving of a :class:`~profusion_rt.runtime.Runtime`: FastAPI on uvicorn, one worker thread, dynamic
batching, stored subjects, Prometheus metrics.

Build the app with :func:`create_app` (``profusion-rt serve`` does it from the command line):

* ``POST /v1/generate``: a reference image (multipart file ``image``, or ``image_base64`` in a JSON body)
  and/or a stored ``subject_id``, a ``prompt`` with ``{S*}`` and sampling parameters -> a PNG with the seed,
  the batch size and the timings in headers; with ``?format=json`` (or ``Accept: application/json``) a JSON
  document with base64 PNGs instead;
* ``POST /v1/subjects``: store a customization ``delta`` (``profusion-rt customize`` output) and/or a
  reference ``image`` (its encoding is stored; with ``customize=true`` the server first customizes the model
  on it in the background) -> a server-generated id; ``GET``/``DELETE /v1/subjects/{id}``;
* ``GET /healthz``, ``GET /metrics`` (Prometheus text format).

How a request flows: the handler parses and validates everything it can (body size, image format and
pixels, prompt rules, parameter ranges, subject id) and answers 4xx without touching the model; a valid
request becomes a :class:`Job` in the bounded queue of the :class:`Scheduler` (429 when full). The
scheduler's single worker thread owns the runtime (which is serial anyway): it takes the oldest job, adds
queued jobs it can batch with (same subject delta, same sampling parameters) up to ``max_batch`` images,
waiting at most ``max_wait_ms`` for more, swaps the subject delta in if needed and calls
:meth:`Runtime.generate_batch` once. The handler waits for the result up to the request's timeout (504) and
gives the job up when the client disconnects.

Subjects live in ``<data>/subjects/<id>/`` (``subject.json``, ``delta.safetensors``,
``reference.safetensors``). Ids are 32 random hex digits made by the server; no request value is ever used
as a file-system path. A subject is assembled in a hidden staging folder and renamed into place in one
step, so a crash leaves either no subject or a whole one (stale staging folders are removed at start-up).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import functools
import inspect
import io
import json
import logging
import math
import os
import re
import resource
import secrets
import shutil
import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch

from profusion_rt.core.errors import (BackendUnavailableError, ImageError, InvalidParameterError, ModelLoadError, OutputPathError,
                     ProFusionError, PromptError)

logger = logging.getLogger(__name__)

SUBJECT_FORMAT = "profusion-rt-subject"
SUBJECT_VERSION = 1
_ID_RE = re.compile(r"[0-9a-f]{32}")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SAMPLING_FIELDS = ("num_inference_steps", "guidance_scale", "reference_guidance_scale", "fusion_steps",
                    "fusion_guidance_scale", "fusion_eta", "fusion_embedding_scale")


# ----------------------------------------------------------------------------------------------------------
# Errors (each carries its HTTP status; every other ProFusionError is mapped in :func:`http_status`)
# ----------------------------------------------------------------------------------------------------------


class ServeError(ProFusionError):
    status = 400


class BadRequestError(ServeError, InvalidParameterError):
    """The body is not a well-formed multipart or JSON request."""


class PayloadTooLargeError(ServeError):
    """The body, or the image's pixel count, is over the server's limit."""

    status = 413


class UnsupportedMediaError(ServeError, ImageError):
    """The upload is not an image in one of the accepted formats."""

    status = 415


class UnknownSubjectError(ServeError, KeyError):
    status = 404

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class SubjectNotReadyError(ServeError):
    """The subject is still being customized, its customization failed, or it was made for another model."""

    status = 409


class QueueFullError(ServeError):
    status = 429


class RequestTimeoutError(ServeError):
    status = 504


class ShuttingDownError(ServeError):
    status = 503


class _ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def http_status(exc: ProFusionError) -> int:
    """The HTTP status of a typed error: 4xx for what the request got wrong, 5xx for the server's side."""
    if isinstance(exc, ServeError):
        return exc.status
    if isinstance(exc, (PromptError, InvalidParameterError)):
        return 422
    if isinstance(exc, ImageError):
        return 400
    if isinstance(exc, ModelLoadError):  # an uploaded delta that is not one, or made for another model
        return 422
    if isinstance(exc, BackendUnavailableError):
        return 503
    if isinstance(exc, OutputPathError):
        return 500
    return 400


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ServeConfig:
    """Limits and behaviour of the server (``profusion-rt serve`` has one option per field)."""

    data_dir: Path = Path("serve-data")
    max_queue: int = 32  # queued jobs (not counting the batch being run); more -> 429
    max_batch: int = 4  # images per runtime batch; also the most images one request may ask for
    max_wait_ms: float = 10.0  # how long the worker waits for compatible requests once it has one
    timeout_s: float = 120.0  # per request, queue wait included; a request may ask for less -> 504
    max_upload_bytes: int = 10 * 2**20  # body of /v1/generate and of image-only /v1/subjects
    max_delta_bytes: int = 4 * 2**30  # body of /v1/subjects (a delta of SD2 is ~1.7 GB in fp32)
    max_pixels: int = 4096 * 4096  # reference image width x height
    image_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
    steps_limit: int = 50  # most num_inference_steps a request may ask for
    default_steps: int = 50
    fusion_steps_limit: int = 4
    max_prompt_chars: int = 1000
    allow_customize: bool = True  # POST /v1/subjects customize=true
    customize_steps: int = 100
    customize_steps_limit: int = 500
    customize_augmentations: int = 31
    max_customize_jobs: int = 2  # queued + running customizations; more -> 429
    subject_cache: int = 4  # loaded subjects kept in memory
    warmup_steps: int = 2  # one warm-up request at start-up (0: none)
    poll_interval_s: float = 0.05  # how often a waiting handler checks for a client disconnect

    def __post_init__(self):
        self.data_dir = Path(self.data_dir)
        for name in ("max_queue", "max_batch", "max_upload_bytes", "max_delta_bytes", "max_pixels", "steps_limit",
                     "default_steps", "max_prompt_chars", "customize_steps", "customize_steps_limit",
                     "max_customize_jobs", "subject_cache"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParameterError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("fusion_steps_limit", "customize_augmentations", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidParameterError(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("max_wait_ms", "timeout_s", "poll_interval_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (
                    name != "max_wait_ms" and value == 0):
                raise InvalidParameterError(f"{name} must be a positive number, got {value!r}")
        if self.default_steps > self.steps_limit:
            raise InvalidParameterError(f"default_steps ({self.default_steps}) is above steps_limit ({self.steps_limit})")
        if self.customize_steps > self.customize_steps_limit:
            raise InvalidParameterError(
                f"customize_steps ({self.customize_steps}) is above customize_steps_limit ({self.customize_steps_limit})")


# ----------------------------------------------------------------------------------------------------------
# Metrics (Prometheus text exposition format 0.0.4)
# ----------------------------------------------------------------------------------------------------------


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{v}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help_text, labels
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items()) or ([((), 0.0)] if not self.label_names else [])
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {v:.17g}" for k, v in items]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float]):
        super().__init__(name, help_text)
        self.read = read

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {float(self.read()):.17g}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()):
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets))
        self._series: dict[tuple[str, ...], list[float]] = {}  # bucket counts..., sum, count

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            series = self._series.setdefault(labels, [0.0] * (len(self.buckets) + 2))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    series[i] += 1
            series[-2] += value
            series[-1] += 1

    def snapshot(self, *labels: str) -> dict[float, float]:
        """Cumulative counts by upper bound (``math.inf`` = all observations)."""
        with self._lock:
            series = list(self._series.get(labels, [0.0] * (len(self.buckets) + 2)))
        out = dict(zip(self.buckets, series))
        out[math.inf] = series[-1]
        return out

    def render(self) -> list[str]:
        lines = self.header()
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        if not items and not self.label_names:
            items = [((), [0.0] * (len(self.buckets) + 2))]
        for key, series in items:
            for bound, count in zip(self.buckets, series):
                labels = _labels(self.label_names, key, 'le="%g"' % bound)
                lines.append(f"{self.name}_bucket{labels} {count:.17g}")
            labels = _labels(self.label_names, key, 'le="+Inf"')
            lines.append(f"{self.name}_bucket{labels} {series[-1]:.17g}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {series[-2]:.17g}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {series[-1]:.17g}")
        return lines


def resident_memory_bytes() -> int:
    """Current resident set size of this process (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_memory_bytes()


def peak_memory_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if os.uname().sysname == "Darwin" else 1024)


class Metrics:
    """The server's counters, gauges and histograms."""

    LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

    def __init__(self, queue_depth: Callable[[], float], device: torch.device | None = None):
        self.started = time.time()
        self.requests = Counter("profusion_http_requests_total", "HTTP requests by route and status code.",
                                ("route", "status"))
        self.latency = Histogram("profusion_http_request_duration_seconds",
                                 "Time from request start to response start, by route.", self.LATENCY_BUCKETS,
                                 ("route",))
        self.queue_wait = Histogram("profusion_queue_wait_seconds", "Time a generation waited in the queue.",
                                    self.LATENCY_BUCKETS)
        self.batch_size = Histogram("profusion_batch_size_images", "Images per runtime batch.",
                                    (1, 2, 3, 4, 6, 8, 12, 16, 32, 64))
        self.batch_requests = Histogram("profusion_batch_size_requests", "Requests per runtime batch.",
                                        (1, 2, 3, 4, 6, 8, 12, 16, 32, 64))
        self.images = Counter("profusion_images_generated_total", "Images generated.")
        self.stage_seconds = Counter("profusion_runtime_seconds_total", "Runtime time by stage.", ("stage",))
        self.rejected = Counter("profusion_requests_rejected_total", "Requests refused because the queue was full.")
        self.cancelled = Counter("profusion_requests_cancelled_total",
                                 "Requests given up because the client disconnected.")
        self.timed_out = Counter("profusion_requests_timed_out_total", "Requests that ran past their timeout.")
        self.failed = Counter("profusion_jobs_failed_total", "Queued jobs that ended with an error.", ("type",))
        self.delta_swaps = Counter("profusion_delta_swaps_total", "Subject delta swaps (including back to base).")
        self.subjects_created = Counter("profusion_subjects_created_total", "Subjects stored, by source.",
                                        ("source",))
        device = torch.device(device or "cpu")
        self.gauges = [
            Gauge("profusion_queue_depth", "Jobs waiting in the queue.", queue_depth),
            Gauge("process_resident_memory_bytes", "Resident memory of the server process.", resident_memory_bytes),
            Gauge("process_peak_resident_memory_bytes", "Peak resident memory of the server process.",
                  peak_memory_bytes),
            Gauge("profusion_uptime_seconds", "Seconds since the server started.", lambda: time.time() - self.started),
        ]
        if device.type == "cuda":
            self.gauges.append(Gauge("profusion_cuda_memory_allocated_bytes", "CUDA memory held by tensors.",
                                     lambda: torch.cuda.memory_allocated(device)))
            self.gauges.append(Gauge("profusion_cuda_memory_reserved_bytes", "CUDA memory reserved by torch.",
                                     lambda: torch.cuda.memory_reserved(device)))

    def render(self) -> str:
        metrics: list[Any] = [self.requests, self.latency, self.queue_wait, self.batch_size, self.batch_requests,
                              self.images, self.stage_seconds, self.rejected, self.cancelled, self.timed_out,
                              self.failed, self.delta_swaps, self.subjects_created, *self.gauges]
        lines: list[str] = []
        for metric in metrics:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# The scheduler: a bounded queue and one worker thread that batches compatible requests
# ----------------------------------------------------------------------------------------------------------


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
        return (self.delta_key,) + tuple(kw.get(name) for name in _SAMPLING_FIELDS)


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
        from profusion_rt.training.delta import apply_delta

        pipe = copy.deepcopy(self.runtime.pipe)
        if self._current is not None:
            apply_delta(pipe, self.base_delta, base_fingerprint=self.base_delta.base_fingerprint)
        return pipe


# ----------------------------------------------------------------------------------------------------------
# Subjects on disk
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Subject:
    id: str
    meta: dict[str, Any]
    delta: Any = None  # training.delta.Delta
    reference: Any = None  # pipeline.ReferenceEncoding


@dataclass
class CustomizationJob:
    id: str
    status: str  # "queued", "training", "failed"
    steps: int
    step: int = 0
    error: str | None = None
    created: float = field(default_factory=time.time)


def check_subject_id(subject_id: Any) -> str:
    """The id if it is one the server could have made (32 lower-case hex digits); 404 otherwise."""
    if not isinstance(subject_id, str) or not _ID_RE.fullmatch(subject_id):
        raise UnknownSubjectError(f"unknown subject id {str(subject_id)[:80]!r}")
    return subject_id


class SubjectStore:
    """Subjects in ``<data_dir>/subjects/<id>/``, written atomically, loaded through a small LRU cache."""

    STAGING_PREFIX = ".staging-"
    META, DELTA, REFERENCE = "subject.json", "delta.safetensors", "reference.safetensors"

    def __init__(self, data_dir: str | os.PathLike, model_hash: str, base_fingerprint: str, cache_size: int = 4):
        self.root = Path(data_dir).expanduser().resolve() / "subjects"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputPathError(f"cannot create the subject folder {self.root}: {exc.strerror or exc}") from exc
        self.model_hash, self.base_fingerprint = model_hash, base_fingerprint
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Subject] = OrderedDict()
        self._lock = threading.Lock()
        self.jobs: dict[str, CustomizationJob] = {}
        for stale in self.root.glob(self.STAGING_PREFIX + "*"):
            logger.warning("removing an unfinished subject from an earlier run: %s", stale.name)
            shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(16)

    def path(self, subject_id: str) -> Path:
        return self.root / check_subject_id(subject_id)

    @contextmanager
    def staging(self, subject_id: str) -> Iterator[Path]:
        """A hidden folder to assemble subject ``subject_id`` in; renamed into place when the block ends
        without an error (the caller writes ``subject.json`` last), removed otherwise."""
        target = self.path(subject_id)
        tmp = self.root / f"{self.STAGING_PREFIX}{subject_id}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            yield tmp
            if not (tmp / self.META).is_file():
                raise OutputPathError(f"subject {subject_id} was staged without {self.META}")
            for item in tmp.iterdir():
                _fsync_path(item)
            _fsync_path(tmp)
            os.rename(tmp, target)  # atomic; ids are fresh, so the target does not exist
            _fsync_path(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def write_meta(self, folder: Path, meta: dict[str, Any]) -> None:
        (folder / self.META).write_text(json.dumps(meta, indent=1, sort_keys=True))

    def meta(self, subject_id: str, source: str, *, has_delta: bool, reference: dict | None,
             name: str | None = None, **extra) -> dict[str, Any]:
        return {
            "format": SUBJECT_FORMAT, "version": SUBJECT_VERSION, "id": subject_id, "source": source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "name": name,
            "has_delta": has_delta, "has_reference": reference is not None, "reference": reference,
            "model_hash": self.model_hash, "base_fingerprint": self.base_fingerprint, **extra,
        }

    def exists(self, subject_id: str) -> bool:
        return (self.path(subject_id) / self.META).is_file()

    def read_meta(self, subject_id: str) -> dict[str, Any]:
        path = self.path(subject_id) / self.META
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise UnknownSubjectError(f"unknown subject id {subject_id!r}") from None
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"subject {subject_id} is unreadable: {exc}") from exc

    def remember(self, subject: Subject) -> Subject:
        with self._lock:
            self._cache[subject.id] = subject
            self._cache.move_to_end(subject.id)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return subject

    def load(self, subject_id: str, device: torch.device, dtype: torch.dtype) -> Subject:
        """The subject with its delta and reference encoding in memory; 404 if unknown, 409 if not usable."""
        from profusion_rt.pipeline import ReferenceEncoding
        from profusion_rt.training.delta import load_delta
        from profusion_rt.training.safeio import read

        check_subject_id(subject_id)
        with self._lock:
            cached = self._cache.get(subject_id)
            if cached is not None:
                self._cache.move_to_end(subject_id)
                return cached
        job = self.jobs.get(subject_id)
        if job is not None:
            detail = f"failed: {job.error}" if job.status == "failed" else f"{job.status} (step {job.step}/{job.steps})"
            raise SubjectNotReadyError(f"subject {subject_id} is not ready: customization {detail}")
        meta = self.read_meta(subject_id)
        if meta.get("model_hash") != self.model_hash:
            raise SubjectNotReadyError(f"subject {subject_id} was made for another model ({meta.get('model_hash')}, "
                                       f"this server serves {self.model_hash})")
        folder = self.path(subject_id)
        subject = Subject(subject_id, meta)
        if meta.get("has_delta"):
            subject.delta = load_delta(folder / self.DELTA).to(device)
        if meta.get("has_reference"):
            tensors, _ = read(folder / self.REFERENCE, ModelLoadError, "subject reference")
            subject.reference = ReferenceEncoding(tensors["latents"].to(device, dtype),
                                                  tensors["image_tokens"].to(device, dtype))
        return self.remember(subject)

    def delete(self, subject_id: str) -> None:
        folder = self.path(subject_id)
        if not (folder / self.META).is_file():
            raise UnknownSubjectError(f"unknown subject id {subject_id!r}")
        trash = self.root / f"{self.STAGING_PREFIX}deleted-{subject_id}-{secrets.token_hex(4)}"
        os.rename(folder, trash)  # atomic: the subject is gone at once, the files follow
        shutil.rmtree(trash, ignore_errors=True)
        with self._lock:
            self._cache.pop(subject_id, None)


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not fsync folders
    finally:
        os.close(fd)


def save_reference(path: Path, reference, mode: str, seed: int) -> None:
    from safetensors.torch import save_file

    save_file({"latents": reference.latents.detach().to("cpu").contiguous(),
               "image_tokens": reference.image_tokens.detach().to("cpu").contiguous()},
              str(path), metadata={"format": "profusion-rt-reference", "mode": mode, "seed": str(seed)})


# ----------------------------------------------------------------------------------------------------------
# Request parsing and validation
# ----------------------------------------------------------------------------------------------------------


def _pydantic_models():
    from pydantic import BaseModel, ConfigDict, Field

    class _Base(BaseModel):
        model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    class GenerateFields(_Base):
        prompt: str
        subject_id: str | None = None
        image_base64: str | None = None
        class_word: str = Field("person", min_length=1, max_length=64)
        negative_prompt: str | None = None
        num_inference_steps: int | None = Field(None, ge=1)
        guidance_scale: float = Field(7.0, ge=0, le=100)
        reference_guidance_scale: float = Field(5.0, ge=0, le=100)
        fusion_steps: int = Field(1, ge=0)
        fusion_guidance_scale: float = Field(7.0, ge=0, le=100)
        fusion_eta: float = Field(1.0, ge=0, le=1)
        fusion_embedding_scale: float = Field(0.6, ge=0, le=10)
        seed: int | None = Field(None, ge=0, le=2**62)
        num_images: int = Field(1, ge=1)
        reference_mode: Literal["sample", "mean"] = "sample"
        timeout_s: float | None = Field(None, gt=0)

    class SubjectFields(_Base):
        name: str | None = Field(None, max_length=100)
        customize: bool = False
        customize_steps: int | None = Field(None, ge=1)
        reference_mode: Literal["sample", "mean"] = "sample"
        seed: int = Field(0, ge=0, le=2**62)

    return GenerateFields, SubjectFields


@functools.lru_cache(maxsize=1)
def _models():
    return _pydantic_models()


def _validate_fields(model, data: dict[str, Any]):
    from pydantic import ValidationError

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        message = first.get("msg", "invalid value")
        if first.get("type") == "extra_forbidden":
            message = "unknown field"
        raise InvalidParameterError(f"{where}: {message}") from None


class _BodyTooLarge(Exception):
    pass


def _limited(request, limit: int):
    """A copy of ``request`` whose body reads raise :class:`_BodyTooLarge` beyond ``limit`` bytes."""
    from starlette.requests import Request

    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise BadRequestError("the Content-Length header is not a number") from None
        if declared > limit:
            raise PayloadTooLargeError(f"the request body is {declared} bytes; the limit is {limit}")
    seen = 0

    async def receive():
        nonlocal seen
        message = await request.receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge()
        return message

    return Request(request.scope, receive)


async def read_request(request, limit: int, files: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(fields, uploads)`` of a multipart, url-encoded or JSON body of at most ``limit`` bytes. ``uploads`` maps the
    allowed file field names to ``UploadFile`` objects (multipart) or decoded bytes (``<name>_base64`` JSON
    fields); the caller closes upload files via :func:`close_uploads`."""
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limited = _limited(request, limit)
    try:
        if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
            form = await limited.form(max_files=len(files), max_fields=64, max_part_size=64 * 1024)
            fields: dict[str, Any] = {}
            uploads: dict[str, Any] = {}
            try:
                for key, value in form.multi_items():
                    if key in fields or key in uploads:
                        raise InvalidParameterError(f"{key}: given more than once")
                    if isinstance(value, UploadFile):
                        if key not in files:
                            raise InvalidParameterError(f"{key}: unexpected file upload")
                        uploads[key] = value
                    elif key in files:
                        raise InvalidParameterError(f"{key}: must be a file upload")
                    else:
                        fields[key] = value
            except BaseException:
                await form.close()
                raise
            return fields, uploads
        if content_type == "application/json":
            body = await limited.body()
            try:
                data = json.loads(body)
            except ValueError as exc:
                raise BadRequestError(f"the body is not valid JSON ({exc})") from None
            if not isinstance(data, dict):
                raise BadRequestError("the JSON body must be an object")
            uploads = {}
            for name in files:
                encoded = data.pop(f"{name}_base64", None)
                if encoded is not None:
                    if not isinstance(encoded, str):
                        raise InvalidParameterError(f"{name}_base64: must be a base64 string")
                    try:
                        uploads[name] = base64.b64decode(encoded, validate=True)
                    except ValueError:
                        raise BadRequestError(f"{name}_base64 is not valid base64") from None
            return data, uploads
    except _BodyTooLarge:
        raise PayloadTooLargeError(f"the request body is over the limit of {limit} bytes") from None
    except HTTPException as exc:  # malformed multipart
        raise BadRequestError(f"malformed multipart body: {exc.detail}") from None
    except ClientDisconnect:
        raise _ClientGone() from None
    raise UnsupportedMediaError("send multipart/form-data, application/x-www-form-urlencoded or application/json, "
                                f"not {content_type or 'a body without Content-Type'}")


async def close_uploads(uploads: dict[str, Any]) -> None:
    for value in uploads.values():
        close = getattr(value, "close", None)
        if close is not None:
            await close()


async def upload_bytes(value, limit: int, name: str) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    else:
        data = await value.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLargeError(f"the {name} upload is over the limit of {limit} bytes")
    return data


def decode_image(data: bytes, config: ServeConfig):
    """An uploaded reference image as an RGB PIL image: 415 if it is not one of the accepted formats, 413
    above ``max_pixels``, 400 if it is damaged."""
    from PIL import Image, UnidentifiedImageError

    from profusion_rt.core.image_io import load_image

    if not data:
        raise ImageError("the image upload is empty (0 bytes)")
    accepted = ", ".join(config.image_formats)
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt, (width, height) = probe.format, probe.size
    except UnidentifiedImageError:
        raise UnsupportedMediaError(f"the upload is not an image in an accepted format ({accepted})") from None
    except Image.DecompressionBombError as exc:
        raise PayloadTooLargeError(f"the image is too large to decode ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure means a damaged upload
        raise ImageError(f"the image cannot be read ({type(exc).__name__}: {exc})") from None
    if fmt not in config.image_formats:
        raise UnsupportedMediaError(f"image format {fmt} is not accepted; send {accepted}")
    if width * height > config.max_pixels:
        raise PayloadTooLargeError(
            f"the image is {width}x{height} = {width * height} pixels; the limit is {config.max_pixels}")
    return load_image(data, max_pixels=config.max_pixels)


def check_prompt(tokenizer, prompt: str, class_word: str, max_chars: int, negative_prompt: str | None = None) -> None:
    """The prompt rules of the server (:class:`PromptError`, 422): one ``{S*}``, at most 77 tokens (the class
    prompt too), no control characters, at most ``max_chars`` characters; a negative prompt: no ``{S*}``, at
    most 77 tokens and ``max_chars`` characters, no control characters."""
    from profusion_rt.models.tokenizer import PLACEHOLDER, replace_placeholder, tokenize_prompt
    from profusion_rt.pipeline import tokenize_negative_prompt

    if negative_prompt is not None:
        if len(negative_prompt) > max_chars:
            raise PromptError(f"the negative_prompt is {len(negative_prompt)} characters long; the limit is {max_chars}")
        if _CONTROL_RE.search(negative_prompt):
            raise PromptError("the negative_prompt contains control characters")
        tokenize_negative_prompt(tokenizer, negative_prompt)

    if not prompt.strip():
        raise PromptError("the prompt is empty")
    if len(prompt) > max_chars:
        raise PromptError(f"the prompt is {len(prompt)} characters long; the limit is {max_chars}")
    for text, what in ((prompt, "prompt"), (class_word, "class_word")):
        if _CONTROL_RE.search(text):
            raise PromptError(f"the {what} contains control characters")
    if not class_word.strip() or any(c in class_word for c in "{}"):
        raise PromptError(f"class_word must be a plain word such as 'person', got {class_word!r}")
    tokenize_prompt(tokenizer, prompt, require_placeholder=True)
    try:
        tokenize_prompt(tokenizer, replace_placeholder(prompt, class_word))
    except PromptError as exc:
        raise PromptError(f"with {PLACEHOLDER} replaced by the class word: {exc}") from None


# ----------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------


def error_response(exc: ProFusionError, status: int | None = None, headers: dict[str, str] | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"type": type(exc).__name__, "message": str(exc)}},
                        status_code=status or http_status(exc), headers=headers)


def _route_label(path: str) -> str:
    for prefix in ("/v1/generate", "/v1/subjects", "/healthz", "/metrics"):
        if path == prefix or path.startswith(prefix + "/"):
            return prefix
    return "other"


class _MetricsMiddleware:
    """Counts every HTTP response by route and status, and times it (until the response starts)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route, start, status = _route_label(scope.get("path", "")), time.perf_counter(), [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                self.metrics.latency.observe(time.perf_counter() - start, route)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.inc(1, route, str(status[0]))


class Server:
    """The state behind the app: runtime, scheduler, subjects, metrics. Build it with :func:`create_app`."""

    def __init__(self, runtime, config: ServeConfig):
        from profusion_rt.artifacts.store import model_hash
        from profusion_rt.training.delta import base_fingerprint, extract_delta

        self.runtime, self.config = runtime, config
        self.pipe = runtime.pipe
        fingerprint = base_fingerprint(self.pipe)
        self.base_delta = extract_delta(self.pipe, fingerprint)
        self.model_hash = model_hash(self.pipe)
        self.scheduler = Scheduler(runtime, config.max_queue, config.max_batch, config.max_wait_ms / 1000,
                                   base_delta=self.base_delta)
        self.metrics = self.scheduler.metrics
        self.subjects = SubjectStore(config.data_dir, self.model_hash, fingerprint, config.subject_cache)
        self._customizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="profusion-customize")
        self._stop = threading.Event()
        self.ready = False

    # -- life cycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        steps = [self.config.warmup_steps] if self.config.warmup_steps else []
        if steps and getattr(self.runtime, "use_cuda_graph", False) and self.config.default_steps not in steps:
            # CUDA graphs are captured per shape (steps included): capture the served default now, so no capture
            # happens later while a customization thread uses the GPU
            steps.append(self.config.default_steps)
        for n in steps:
            start = time.perf_counter()
            self.runtime.warmup(num_inference_steps=n)
            logger.info("warm-up (%d steps): %.2f s", n, time.perf_counter() - start)
        self.scheduler.start()
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        self._stop.set()
        self._customizer.shutdown(wait=True, cancel_futures=True)
        self.scheduler.stop()

    # -- generation ----------------------------------------------------------------------------------------
    async def generate(self, request):
        from starlette.concurrency import run_in_threadpool

        start = time.perf_counter()
        GenerateFields, _ = _models()
        data, uploads = await read_request(request, self.config.max_upload_bytes, ("image",))
        try:
            p = _validate_fields(GenerateFields, data)
            image_data = await upload_bytes(uploads["image"], self.config.max_upload_bytes, "image") \
                if "image" in uploads else None
        finally:
            await close_uploads(uploads)
        want_json = request.query_params.get("format") == "json" or \
            "application/json" in request.headers.get("accept", "")
        steps = self.config.default_steps if p.num_inference_steps is None else p.num_inference_steps
        if steps > self.config.steps_limit:
            raise InvalidParameterError(f"num_inference_steps: {steps} is above this server's limit of "
                                        f"{self.config.steps_limit}")
        if p.fusion_steps > self.config.fusion_steps_limit:
            raise InvalidParameterError(f"fusion_steps: {p.fusion_steps} is above this server's limit of "
                                        f"{self.config.fusion_steps_limit}")
        if p.num_images > self.config.max_batch:
            raise InvalidParameterError(f"num_images: at most {self.config.max_batch} per request")
        if p.num_images > 1 and not want_json:
            raise InvalidParameterError("num_images: a PNG answer holds one image; ask for ?format=json")
        check_prompt(self.pipe.tokenizer, p.prompt, p.class_word, self.config.max_prompt_chars, p.negative_prompt)
        subject = None
        if p.subject_id is not None:
            subject = await run_in_threadpool(self.subjects.load, p.subject_id, self.pipe.device, self.pipe.dtype)
        if image_data is None and (subject is None or subject.reference is None):
            raise InvalidParameterError("give a reference image (file 'image') or the id of a subject stored with one"
                                        if subject is None else
                                        f"subject {subject.id} has no stored reference image; upload one as 'image'")
        kwargs: dict[str, Any] = dict(
            prompt=p.prompt, class_word=p.class_word, negative_prompt=p.negative_prompt,
            num_inference_steps=steps, guidance_scale=p.guidance_scale,
            reference_guidance_scale=p.reference_guidance_scale, fusion_steps=p.fusion_steps,
            fusion_guidance_scale=p.fusion_guidance_scale, fusion_eta=p.fusion_eta,
            fusion_embedding_scale=p.fusion_embedding_scale,
            seed=p.seed if p.seed is not None else secrets.randbelow(2**31),
            num_images_per_prompt=p.num_images, reference_mode=p.reference_mode, output_type="pil")
        if image_data is not None:
            kwargs["reference_image"] = await run_in_threadpool(decode_image, image_data, self.config)
        else:
            kwargs["reference"] = subject.reference
        timeout = min(p.timeout_s or self.config.timeout_s, self.config.timeout_s)
        job = Job(kwargs=kwargs, images=p.num_images, delta_key=subject.id if subject and subject.delta else None,
                  delta=subject.delta if subject else None, deadline=time.monotonic() + timeout)
        result: GenerationResult = await self._wait(request, job, start + timeout - time.perf_counter())
        from profusion_rt.core.presets import weights_label

        png_text = {"weights": weights_label(self.pipe)}
        pngs = await run_in_threadpool(lambda: [_png(im, png_text) for im in result.images])
        total_ms = 1000 * (time.perf_counter() - start)
        timings = {"queue_ms": 1000 * result.queue_s, "swap_ms": 1000 * result.swap_s,
                   "prepare_ms": 1000 * result.prepare_s, "loop_ms": 1000 * result.loop_s,
                   "decode_ms": 1000 * result.decode_s, "total_ms": total_ms}
        headers = {
            "X-Request-Id": uuid.uuid4().hex,
            "X-Seed": ",".join(str(s) for s in result.seeds),
            "X-Batch-Size": str(result.batch_images),
            "X-Batch-Requests": str(result.batch_requests),
            "Server-Timing": ", ".join(f"{k[:-3]};dur={v:.1f}" for k, v in timings.items()),
        }
        if subject is not None:
            headers["X-Subject-Id"] = subject.id
        if want_json:
            from fastapi.responses import JSONResponse

            return JSONResponse({
                "images": [base64.b64encode(b).decode("ascii") for b in pngs], "media_type": "image/png",
                "seeds": result.seeds, "subject_id": subject.id if subject else None,
                "batch_size": result.batch_images, "batch_requests": result.batch_requests,
                "timings": {k: round(v, 3) for k, v in timings.items()},
            }, headers=headers)
        from fastapi.responses import Response

        return Response(pngs[0], media_type="image/png", headers=headers)

    async def _wait(self, request, job: Job, timeout: float):
        """Queue ``job`` and wait for it: 504 after ``timeout`` s, given up when the client disconnects."""
        self.scheduler.submit(job)
        waiter = asyncio.wrap_future(job.future)
        deadline = time.monotonic() + max(timeout, 0.0)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.scheduler.cancel(job)
                    self.metrics.timed_out.inc()
                    raise RequestTimeoutError(f"no answer within {timeout:.1f} s")
                done, _ = await asyncio.wait({waiter}, timeout=min(self.config.poll_interval_s, remaining))
                if done:
                    return waiter.result()
                if await request.is_disconnected():
                    self.scheduler.cancel(job)
                    self.metrics.cancelled.inc()
                    logger.info("client went away; request dropped")
                    raise _ClientGone()
        except asyncio.CancelledError:
            self.scheduler.cancel(job)
            raise

    # -- subjects ------------------------------------------------------------------------------------------
    async def create_subject(self, request):
        from starlette.concurrency import run_in_threadpool

        _, SubjectFields = _models()
        limit = max(self.config.max_delta_bytes, self.config.max_upload_bytes)
        data, uploads = await read_request(request, limit, ("delta", "image"))
        try:
            p = _validate_fields(SubjectFields, data)
            if "delta" not in uploads and "image" not in uploads:
                raise InvalidParameterError("give a delta file ('delta'), a reference image ('image'), or both")
            if p.name is not None and _CONTROL_RE.search(p.name):
                raise InvalidParameterError("name: contains control characters")
            if p.customize:
                if not self.config.allow_customize:
                    raise InvalidParameterError("customize: this server does not customize (started with --no-customize)")
                if "image" not in uploads or "delta" in uploads:
                    raise InvalidParameterError("customize: give a reference image and no delta")
            if p.customize_steps is not None and not p.customize:
                raise InvalidParameterError("customize_steps: only with customize=true")
            steps = p.customize_steps or self.config.customize_steps
            if steps > self.config.customize_steps_limit:
                raise InvalidParameterError(f"customize_steps: {steps} is above this server's limit of "
                                            f"{self.config.customize_steps_limit}")
            image = None
            if "image" in uploads:
                image_data = await upload_bytes(uploads["image"], self.config.max_upload_bytes, "image")
                image = await run_in_threadpool(decode_image, image_data, self.config)
            subject_id = self.subjects.new_id()
            if p.customize:
                job = self._start_customization(subject_id, image, steps, p.reference_mode, p.seed, p.name)
                return _json({"id": subject_id, "status": job.status, "has_delta": True, "has_reference": True},
                             202)
            with self.subjects.staging(subject_id) as folder:
                delta = None
                if "delta" in uploads:
                    await _copy_upload(uploads["delta"], folder / SubjectStore.DELTA, self.config.max_delta_bytes)
                    delta = await run_in_threadpool(self._check_delta, folder / SubjectStore.DELTA)
                reference = None
                if image is not None:
                    encode = functools.partial(self.pipe.encode_reference, image, mode=p.reference_mode, seed=p.seed)
                    reference = await self._wait(request, Job(task=encode), self.config.timeout_s)
                    save_reference(folder / SubjectStore.REFERENCE, reference, p.reference_mode, p.seed)
                meta = self.subjects.meta(
                    subject_id, "delta" if delta is not None else "image", has_delta=delta is not None,
                    reference={"mode": p.reference_mode, "seed": p.seed} if reference is not None else None,
                    name=p.name)
                self.subjects.write_meta(folder, meta)
        finally:
            await close_uploads(uploads)
        self.subjects.remember(Subject(subject_id, meta, delta, reference))
        self.metrics.subjects_created.inc(1, meta["source"])
        logger.info("stored subject %s (%s)", subject_id, meta["source"])
        return _json({"id": subject_id, "status": "ready", "has_delta": meta["has_delta"],
                      "has_reference": meta["has_reference"]}, 201)

    def _check_delta(self, path: Path):
        """Load an uploaded delta and check it fits this server's base model (422 otherwise)."""
        from profusion_rt.training.delta import delta_parameters, load_delta
        from profusion_rt.training.errors import DeltaMismatchError

        delta = load_delta(path)
        targets = delta_parameters(self.pipe)
        if set(delta.tensors) != set(targets):
            raise DeltaMismatchError(f"the delta holds {len(delta.tensors)} tensors, not the {len(targets)} this "
                                     "model's delta has")
        for name, param in targets.items():
            if tuple(delta.tensors[name].shape) != tuple(param.shape):
                raise DeltaMismatchError(f"the delta does not fit this model: {name} is "
                                         f"{tuple(delta.tensors[name].shape)}, the model's {tuple(param.shape)}")
        if delta.base_fingerprint != self.base_delta.base_fingerprint:
            raise DeltaMismatchError("the delta was made for another base model (base fingerprint "
                                     f"{delta.base_fingerprint[:12]}..., this server's "
                                     f"{self.base_delta.base_fingerprint[:12]}...)")
        return delta.to(self.pipe.device)

    def _start_customization(self, subject_id: str, image, steps: int, mode: str, seed: int, name: str | None):
        jobs = list(self.subjects.jobs.values())
        active = [j for j in jobs if j.status in ("queued", "training")]
        if len(active) >= self.config.max_customize_jobs:
            raise QueueFullError(f"{len(active)} customizations are queued or running already; retry later")
        for old in sorted((j for j in jobs if j.status == "failed"), key=lambda j: j.created)[:-100]:
            self.subjects.jobs.pop(old.id, None)  # keep the last 100 failures to report
        job = CustomizationJob(subject_id, "queued", steps)
        self.subjects.jobs[subject_id] = job
        self._customizer.submit(self._customize, job, image, mode, seed, name)
        return job

    def _customize(self, job: CustomizationJob, image, mode: str, seed: int, name: str | None) -> None:
        """Background: customize a base copy of the model on ``image``, then store delta + reference."""
        from profusion_rt.training import TrainConfig, customize, save_delta

        try:
            copy_job = Job(task=self.scheduler.base_pipeline_copy)
            while True:  # the copy is made on the worker, between batches; wait for room in the queue
                try:
                    self.scheduler.submit(copy_job)
                    break
                except QueueFullError:
                    if self._stop.wait(0.5):
                        raise ShuttingDownError("the server is shutting down") from None
            pipe = copy_job.future.result()
            job.status = "training"

            def progress(trainer, loss):
                job.step = trainer.step
                if self._stop.is_set():
                    raise ShuttingDownError("the server is shutting down")

            start = time.perf_counter()
            result = customize(pipe, image, steps=job.steps, config=TrainConfig.customization(seed=seed),
                               num_augmentations=self.config.customize_augmentations, progress=False,
                               callback=progress)
            reference = pipe.encode_reference(image, mode=mode, seed=seed)
            with self.subjects.staging(job.id) as folder:
                save_delta(folder / SubjectStore.DELTA, pipe, result.base_fingerprint,
                           training={"steps": job.steps, "seed": seed, "server": True})
                save_reference(folder / SubjectStore.REFERENCE, reference, mode, seed)
                meta = self.subjects.meta(job.id, "customized", has_delta=True,
                                          reference={"mode": mode, "seed": seed}, name=name,
                                          customize_steps=job.steps,
                                          customize_seconds=round(time.perf_counter() - start, 3))
                self.subjects.write_meta(folder, meta)
            del pipe
            self.subjects.jobs.pop(job.id, None)
            self.metrics.subjects_created.inc(1, "customized")
            logger.info("customized subject %s in %.1f s", job.id, time.perf_counter() - start)
        except BaseException as exc:  # noqa: BLE001 - recorded in the job's status
            job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, ProFusionError):
                logger.exception("customization of subject %s failed", job.id)

    def subject_status(self, subject_id: str) -> dict[str, Any]:
        check_subject_id(subject_id)
        job = self.subjects.jobs.get(subject_id)
        if job is not None:
            return {"id": subject_id, "status": job.status, "step": job.step, "steps": job.steps, "error": job.error}
        meta = self.subjects.read_meta(subject_id)
        return {"id": subject_id, "status": "ready", **{k: meta.get(k) for k in (
            "source", "created", "name", "has_delta", "has_reference", "reference", "customize_steps")}}

    def health(self) -> dict[str, Any]:
        from profusion_rt.core.presets import weights_label

        return {"status": "ok" if self.ready else "starting", "backend": self.runtime.backend,
                "device": str(self.pipe.device), "model_hash": self.model_hash, "resolution": self.pipe.resolution,
                "weights": weights_label(self.pipe),
                "queue_depth": self.scheduler.depth, "max_queue": self.config.max_queue,
                "max_batch": self.config.max_batch, "current_subject": self.scheduler.current_subject}


def _json(data: dict[str, Any], status: int = 200):
    from fastapi.responses import JSONResponse

    return JSONResponse(data, status_code=status)


def _png(image, metadata: dict[str, str] | None = None) -> bytes:
    from profusion_rt.core.image_io import png_info

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(metadata))
    return buffer.getvalue()


async def _copy_upload(upload, target: Path, limit: int) -> None:
    """Copy an upload (an ``UploadFile`` or bytes) into the server-named ``target``, at most ``limit`` bytes."""
    written = 0
    with open(target, "wb") as fh:
        while True:
            if isinstance(upload, (bytes, bytearray)):
                chunk, upload = bytes(upload), b""
            else:
                chunk = await upload.read(1 << 20)
            if not chunk:
                break
            written += len(chunk)
            if written > limit:
                raise PayloadTooLargeError(f"the delta upload is over the limit of {limit} bytes")
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())


def create_app(runtime, config: ServeConfig | None = None):
    """The FastAPI app serving ``runtime``. Start-up (the app's lifespan) warms the runtime and starts the
    worker; shutdown stops it and puts the base weights back. ``app.state.server`` is the :class:`Server`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import PlainTextResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    config = config or ServeConfig()
    server = Server(runtime, config)

    @asynccontextmanager
    async def lifespan(app):
        from starlette.concurrency import run_in_threadpool

        await run_in_threadpool(server.start)
        try:
            yield
        finally:
            await run_in_threadpool(server.stop)

    app = FastAPI(title="profusion-rt", version="1", lifespan=lifespan,
                  description="ProFusion customized text-to-image generation.")
    app.state.server = server

    def guarded(fn):
        async def endpoint(request):
            try:
                return await fn(request)
            except _ClientGone:
                from fastapi.responses import Response

                return Response(status_code=499)
            except QueueFullError as exc:
                return error_response(exc, headers={"Retry-After": "1"})
            except ProFusionError as exc:
                if http_status(exc) >= 500:
                    logger.error("%s: %s", type(exc).__name__, exc)
                return error_response(exc)
            except Exception:  # a bug: log it, answer JSON
                logger.exception("unhandled error on %s", request.url.path)
                return error_response(ProFusionError("internal server error"), 500)

        # FastAPI reads the signature: the one parameter is the request (annotations here are strings).
        endpoint.__signature__ = inspect.Signature(
            [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request)])
        endpoint.__name__, endpoint.__doc__ = fn.__name__, fn.__doc__
        return endpoint

    @app.post("/v1/generate", summary="generate an image of a subject")
    @guarded
    async def generate(request: Request):
        return await server.generate(request)

    @app.post("/v1/subjects", summary="store a subject (delta and/or reference image), or customize one")
    @guarded
    async def create_subject(request: Request):
        return await server.create_subject(request)

    @app.get("/v1/subjects/{subject_id}", summary="a subject's status")
    @guarded
    async def get_subject(request: Request):
        return _json(server.subject_status(request.path_params["subject_id"]))

    @app.delete("/v1/subjects/{subject_id}", summary="delete a subject")
    @guarded
    async def delete_subject(request: Request):
        from starlette.concurrency import run_in_threadpool

        await run_in_threadpool(server.subjects.delete, request.path_params["subject_id"])
        return _json({"id": request.path_params["subject_id"], "status": "deleted"})

    @app.get("/healthz", summary="liveness and readiness")
    async def healthz():
        health = server.health()
        return _json(health, 200 if server.ready else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # unknown routes, wrong methods
        name = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        return _json({"error": {"type": name, "message": str(exc.detail)}}, exc.status_code)

    app.add_middleware(_MetricsMiddleware, metrics=server.metrics)
    return app


# ----------------------------------------------------------------------------------------------------------
# Running uvicorn in a background thread (tests, load checks, embedding next to other code)
# ----------------------------------------------------------------------------------------------------------


class BackgroundServer:
    """uvicorn serving ``app`` on a background thread. ``port=0`` picks a free port; ``url`` says which."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 120.0):
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                lifespan="on", timeout_graceful_shutdown=10)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="profusion-serve-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + startup_timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise BackendUnavailableError(f"the server did not start on {host}:{port}")
            if time.monotonic() > deadline:
                self.stop()
                raise BackendUnavailableError(f"the server did not start within {startup_timeout:.0f} s")
            time.sleep(0.02)
        sock = self._server.servers[0].sockets[0]
        self.host, self.port = sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 60.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

