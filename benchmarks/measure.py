"""Timing, memory, peak-FLOP/s and machine-description helpers shared by the benchmark worker and suite.

Timing rule everywhere: warm-up calls first (not recorded), then ``repeats`` timed calls with
``time.perf_counter`` around a device synchronisation; we keep every sample and report the median and the
spread (min, max, interquartile range). Nothing here asserts on speed.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from typing import Any, Callable

from profusion_rt.core.dtypes import PRECISION_DTYPES


def summarize(samples: list[float]) -> dict[str, Any]:
    """Median and spread of timing samples (seconds); the samples themselves are kept."""
    xs = sorted(float(s) for s in samples)
    if not xs:
        return {"n": 0, "samples": []}
    if len(xs) >= 4:
        q = statistics.quantiles(xs, n=4, method="inclusive")
        iqr = q[2] - q[0]
    else:
        iqr = xs[-1] - xs[0]
    return {
        "n": len(xs),
        "median_s": statistics.median(xs),
        "mean_s": statistics.fmean(xs),
        "min_s": xs[0],
        "max_s": xs[-1],
        "iqr_s": iqr,
        "stdev_s": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "samples": [float(s) for s in samples],
    }


def make_sync(device) -> Callable[[], None]:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    return lambda: None


def time_calls(fn: Callable[[], Any], warmup: int = 1, repeats: int = 5, sync: Callable[[], None] | None = None,
               ) -> dict[str, Any]:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; :func:`summarize` of the wall-clock
    samples, ``cpu`` (the same for this process's CPU time) and ``first_s`` (the first warm-up call, which
    includes compilation and allocation when any).

    CPU time: on a shared machine a single-threaded process is descheduled part of the time; its CPU time
    leaves that out, so it is the steadier measure there (with several threads it sums them)."""
    sync = sync or (lambda: None)
    first = None
    for i in range(max(int(warmup), 0)):
        t = time.perf_counter()
        fn()
        sync()
        if i == 0:
            first = time.perf_counter() - t
    samples, cpu = [], []
    for _ in range(max(int(repeats), 1)):
        c = time.process_time()
        t = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {**summarize(samples), "cpu": summarize(cpu), "first_s": first}


def peak_matmul_flops(device="cpu", dtype: str = "fp32", size: int | None = None, repeats: int = 5,
                      ) -> dict[str, Any]:
    """The machine's dense-matmul FLOP/s in ``dtype``: a square ``size`` x ``size`` matmul (2 n^3 FLOPs),
    one warm-up, ``repeats`` timed calls. ``best`` is the peak (the least disturbed run on a shared
    machine); ``median`` is reported beside it. Threads are whatever torch uses in this process."""
    import torch

    dev = torch.device(device)
    dt = PRECISION_DTYPES[dtype]
    if size is None:
        size = 8192 if dev.type == "cuda" else 2048
    gen = torch.Generator(device=dev).manual_seed(0) if dev.type == "cuda" else torch.Generator().manual_seed(0)
    a = torch.randn(size, size, device=dev, dtype=dt, generator=gen)
    b = torch.randn(size, size, device=dev, dtype=dt, generator=gen)
    sync = make_sync(dev)
    inner = 10 if dev.type == "cuda" else 1

    def call():
        for _ in range(inner):
            torch.mm(a, b)

    stats = time_calls(call, warmup=1, repeats=repeats, sync=sync)
    flops = 2.0 * size**3 * inner
    return {
        "dtype": dtype,
        "device": str(dev),
        "size": size,
        "threads": torch.get_num_threads(),
        "best_flops": flops / stats["min_s"],
        "median_flops": flops / stats["median_s"],
        "best_cpu_flops": flops / stats["cpu"]["min_s"] if stats["cpu"]["min_s"] > 0 else None,
        "timing": stats,
        "what": f"torch.mm of two {size}x{size} {dtype} matrices ({inner} per timed call)",
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process: ``VmHWM`` of /proc/self/status (the high-water mark of this
    address space). ``ru_maxrss`` is the fallback only: Linux carries it across ``exec`` from the forking
    parent, so a worker started by a large parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "fma")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def machine_info(device="cpu") -> dict[str, Any]:
    import torch

    dev = torch.device(device)
    gpu = None
    if dev.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(dev)
        gpu = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
               "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpus": os.cpu_count(),
        "memory_gib": memory_total_gib(),
        "device": str(dev),
        "gpu": gpu,
    }


def versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("torch", "diffusers", "transformers", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu",
                "onnxscript", "polygraphy", "tensorrt", "matplotlib", "triton"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def machine_tag(device="cpu") -> str:
    """A short folder name for results of this machine: ``cpu-<n>core`` or the GPU's name, slugged."""
    import re

    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(dev).lower()
        return re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return f"cpu-{os.cpu_count()}core"
