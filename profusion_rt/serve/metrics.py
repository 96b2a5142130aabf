"""The server's Prometheus metrics, through ``prometheus_client`` (the ``serve`` extra).

Each :class:`Metrics` has its own :class:`~prometheus_client.CollectorRegistry` (two apps in one process do
not share counters) with the standard process, platform and Python garbage-collector collectors
(``process_resident_memory_bytes``, ``process_cpu_seconds_total``, ``python_info``, ``python_gc_*``, ...).
The library writes the text format and escapes label values.

The small wrappers keep the server's calls short (``inc(amount, *labels)``, ``observe(value, *labels)``)
and read values back for tests and health checks (``value(*labels)``, ``snapshot(*labels)``).
"""

from __future__ import annotations

import math
import os
import resource
import time
from typing import Callable

import torch
from prometheus_client import (CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest)
from prometheus_client import Counter as _PromCounter
from prometheus_client import Gauge as _PromGauge
from prometheus_client import Histogram as _PromHistogram

__all__ = ["CONTENT_TYPE", "Counter", "Histogram", "Metrics", "peak_memory_bytes"]

#: the text exposition format 0.0.4 (what generate_latest writes)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Counter:
    """A counter (with or without labels) in a registry."""

    def __init__(self, registry: CollectorRegistry, name: str, help_text: str, labels: tuple[str, ...] = ()):
        self.name, self.label_names = name, labels
        self._metric = _PromCounter(name, help_text, labels, registry=registry)

    def _child(self, labels: tuple[str, ...]):
        return self._metric.labels(*labels) if self.label_names else self._metric

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        self._child(labels).inc(amount)

    def value(self, *labels: str) -> float:
        want = dict(zip(self.label_names, labels))
        for family in self._metric.collect():
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels == want:
                    return sample.value
        return 0.0


class Histogram:
    """A histogram (with or without labels) in a registry."""

    def __init__(self, registry: CollectorRegistry, name: str, help_text: str, buckets: tuple[float, ...],
                 labels: tuple[str, ...] = ()):
        self.name, self.label_names = name, labels
        self.buckets = tuple(sorted(buckets))
        self._metric = _PromHistogram(name, help_text, labels, registry=registry, buckets=self.buckets)

    def observe(self, value: float, *labels: str) -> None:
        (self._metric.labels(*labels) if self.label_names else self._metric).observe(value)

    def snapshot(self, *labels: str) -> dict[float, float]:
        """Cumulative counts by upper bound (``math.inf`` = all observations)."""
        want = dict(zip(self.label_names, labels))
        out = dict.fromkeys(self.buckets, 0.0)
        out[math.inf] = 0.0
        for family in self._metric.collect():
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    rest = {k: v for k, v in sample.labels.items() if k != "le"}
                    if rest == want:
                        out[float(sample.labels["le"])] = sample.value
        return out


def peak_memory_bytes() -> int:
    """Peak resident set size of this process (``getrusage``; kB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if os.uname().sysname == "Darwin" else 1024)


class Metrics:
    """The server's counters, gauges and histograms, in a registry of their own."""

    LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
    BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)

    def __init__(self, queue_depth: Callable[[], float], device: torch.device | str | None = None):
        self.started = time.time()
        self.registry = r = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, ... (Linux)
        PlatformCollector(registry=r)  # python_info
        GCCollector(registry=r)  # python_gc_objects_collected_total, ...
        self.requests = Counter(r, "profusion_http_requests_total", "HTTP requests by route and status code.",
                                ("route", "status"))
        self.latency = Histogram(r, "profusion_http_request_duration_seconds",
                                 "Time from request start to response start, by route.", self.LATENCY_BUCKETS,
                                 ("route",))
        self.queue_wait = Histogram(r, "profusion_queue_wait_seconds", "Time a generation waited in the queue.",
                                    self.LATENCY_BUCKETS)
        self.batch_size = Histogram(r, "profusion_batch_size_images", "Images per runtime batch.", self.BATCH_BUCKETS)
        self.batch_requests = Histogram(r, "profusion_batch_size_requests", "Requests per runtime batch.",
                                        self.BATCH_BUCKETS)
        self.images = Counter(r, "profusion_images_generated_total", "Images generated.")
        self.stage_seconds = Counter(r, "profusion_runtime_seconds_total", "Runtime time by stage.", ("stage",))
        self.rejected = Counter(r, "profusion_requests_rejected_total",
                                "Requests refused because the queue was full.")
        self.cancelled = Counter(r, "profusion_requests_cancelled_total",
                                 "Requests given up because the client disconnected.")
        self.timed_out = Counter(r, "profusion_requests_timed_out_total", "Requests that ran past their timeout.")
        self.failed = Counter(r, "profusion_jobs_failed_total", "Queued jobs that ended with an error.", ("type",))
        self.delta_swaps = Counter(r, "profusion_delta_swaps_total", "Subject delta swaps (including back to base).")
        self.subjects_created = Counter(r, "profusion_subjects_created_total", "Subjects stored, by source.",
                                        ("source",))
        self.unauthorized = Counter(r, "profusion_requests_unauthorized_total",
                                    "Requests refused for a missing or wrong API key.")
        _PromGauge("profusion_queue_depth", "Jobs waiting in the queue.", registry=r).set_function(queue_depth)
        _PromGauge("process_peak_resident_memory_bytes", "Peak resident memory of the server process.",
                   registry=r).set_function(peak_memory_bytes)
        _PromGauge("profusion_uptime_seconds", "Seconds since the server started.",
                   registry=r).set_function(lambda: time.time() - self.started)
        device = torch.device(device or "cpu")
        if device.type == "cuda":
            _PromGauge("profusion_cuda_memory_allocated_bytes", "CUDA memory held by tensors.",
                       registry=r).set_function(lambda: torch.cuda.memory_allocated(device))
            _PromGauge("profusion_cuda_memory_reserved_bytes", "CUDA memory reserved by torch.",
                       registry=r).set_function(lambda: torch.cuda.memory_reserved(device))

    def render(self) -> str:
        """Every metric of the registry in the Prometheus text format 0.0.4 (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry).decode("utf-8")
