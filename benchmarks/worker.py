"""Run ONE backend in this process and write its outputs and timings (``python -m benchmarks.worker``).

Each backend is measured in its own process: torch's OpenMP pool and onnxruntime's thread pool disturb
each other when they share one. The job is a JSON object (``--job``); the worker writes
``<out>/<name>.npz`` (final latents and decoded images, float32) and ``<out>/<name>.json`` (timings of
every run, first-call time, peak memory, versions).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EAGER = "eager"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    from profusion_rt.cli import load_pipeline
    from profusion_rt.demo import demo_reference_image

    backend = job["backend"]
    device = job.get("device", "cpu")
    pipe = load_pipeline(job.get("model", "tiny"), None, device, job.get("dtype", "fp32"), job.get("weights_seed", 0))
    pipe.progress_bar = False
    request = dict(job["request"])
    request["reference_image"] = demo_reference_image() if request.pop("reference", "demo") == "demo" else None

    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    if backend == EAGER:
        def generate():
            t = time.perf_counter()
            req = pipe.prepare(**request)
            sync()
            t1 = time.perf_counter()
            x = pipe.denoise(req)
            sync()
            t2 = time.perf_counter()
            images = pipe.decode(x, "np")
            sync()
            t3 = time.perf_counter()
            return x, images, {"prepare_s": t1 - t, "loop_s": t2 - t1, "decode_s": t3 - t2, "total_s": t3 - t}
    else:
        from profusion_rt.runtime import create_runtime

        runtime = create_runtime(pipe, backend, artifacts=job.get("artifacts"),
                                 **({"precision": job["precision"]} if job.get("precision") else {}))

        def generate():
            t = time.perf_counter()
            out = runtime(output_type="np", **request)
            sync()
            timings = runtime.last_timings
            return out.latents, out.images, {"prepare_s": timings.prepare_s, "loop_s": timings.loop_s,
                                             "decode_s": timings.decode_s, "total_s": time.perf_counter() - t}
    setup_s = time.perf_counter() - t0

    t = time.perf_counter()
    latents, images, _ = generate()  # first call: compilation, graph capture, allocation
    first_call_s = time.perf_counter() - t
    for _ in range(int(job.get("warmup", 0))):
        generate()
    runs = []
    for _ in range(int(job.get("repeats", 3))):
        latents, images, timing = generate()
        runs.append(timing)
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    name = job.get("name", backend)
    np.savez(out / f"{name}.npz", latents=latents.float().cpu().numpy(), images=np.asarray(images, dtype=np.float32))
    totals = [r["total_s"] for r in runs]
    result = {
        "name": name,
        "backend": backend,
        "setup_s": setup_s,
        "first_call_s": first_call_s,
        "runs": runs,
        "median_s": statistics.median(totals),
        "min_s": min(totals),
        "max_s": max(totals),
        "peak_rss_mb": peak_rss_mb(),
        "peak_cuda_mb": (torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "job": {k: v for k, v in job.items() if k != "out"},
    }
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, help="the job as a JSON object")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from profusion_rt.errors import ProFusionError

    try:
        run_job(json.loads(args.job))
    except ProFusionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
