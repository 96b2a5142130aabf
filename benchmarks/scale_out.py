"""Scale-out benchmark (issue 14's targets; docs/scale-out.md): Ray Serve with N Generator replicas against
the single-node server, on the same model and requests.

    python -m profusion_rt.benchmarks.scale_out --replicas 2 --clients 1,4,16 --requests 32 --steps 1

For each engine: throughput (images/s) and p50/p95 latency at each client count, the Ray path's overhead at
one client (its p50 over the single-node p50), and delta swaps per 100 requests with two subjects
alternating (the single-node server swaps on every change of subject; Ray Serve's multiplexing routes each
subject to a replica that holds it). Needs the ``ray`` extra; starts a local Ray cluster on loopback (token
auth off, no dashboard) and stops it at the end. Results as JSON (``--out``) and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import copy
import io
import json
import logging
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from profusion_rt.core.hardware import cpu_model
from profusion_rt.core.samples import synthetic_reference_image
from profusion_rt.pipeline import ProFusionPipeline
from profusion_rt.serve.config import ServeConfig
from profusion_rt.serve.ray.spec import ModelSpec, ScaleSpec
from profusion_rt.models.delta import base_fingerprint, delta_parameters
from profusion_rt.training.delta import save_delta

logger = logging.getLogger(__name__)


def _reference_png() -> bytes:
    buf = io.BytesIO()
    synthetic_reference_image(256).save(buf, format="PNG")
    return buf.getvalue()


def _deltas(pipe, folder: Path) -> list[Path]:
    out = []
    for k in range(2):
        custom = copy.deepcopy(pipe)
        gen = torch.Generator().manual_seed(10 + k)
        with torch.no_grad():
            for param in delta_parameters(custom).values():
                param.add_(0.05 * torch.randn(param.shape, generator=gen))
        out.append(save_delta(folder / f"s{k}.delta.safetensors", custom, base_fingerprint(pipe)))
    return out


def _swaps(url: str) -> float:
    import httpx

    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        m = re.match(r"profusion_delta_swaps_total (\S+)$", line)
        if m:
            return float(m.group(1))
    return 0.0


def _load(url: str, clients: int, requests: int, png: bytes, steps: int) -> dict[str, Any]:
    import httpx

    def one(i: int) -> tuple[float, int]:
        start = time.perf_counter()
        r = httpx.post(f"{url}/v1/generate", timeout=600, files={"image": ("r.png", png, "image/png")},
                       data={"prompt": "a {S*}", "num_inference_steps": str(steps), "seed": str(i)})
        return time.perf_counter() - start, r.status_code

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    ok = sorted(t for t, status in results if status == 200)
    q = statistics.quantiles(ok, n=20) if len(ok) >= 2 else [ok[0]] * 19
    return {"clients": clients, "requests": requests, "ok": len(ok), "images_per_s": len(ok) / wall,
            "p50_s": statistics.median(ok), "p95_s": q[18]}


def _alternating_swaps(url: str, subjects: list[str], requests: int, steps: int) -> float:
    import httpx

    before = _swaps(url)
    for i in range(requests):
        r = httpx.post(f"{url}/v1/generate", timeout=600, data={
            "prompt": "a {S*}", "num_inference_steps": str(steps), "subject_id": subjects[i % 2], "seed": str(i)})
        r.raise_for_status()
    return 100 * (_swaps(url) - before) / requests


def _subjects(url: str, deltas: list[Path], png: bytes) -> list[str]:
    import httpx

    ids = []
    for path in deltas:
        r = httpx.post(f"{url}/v1/subjects", timeout=600, files={
            "delta": ("d.safetensors", path.read_bytes(), "application/octet-stream"),
            "image": ("r.png", png, "image/png")})
        r.raise_for_status()
        ids.append(r.json()["id"])
    return ids


def _measure(url: str, args, png: bytes, deltas: list[Path]) -> dict[str, Any]:
    out = {"load": [_load(url, c, args.requests, png, args.steps) for c in args.clients]}
    out["swaps_per_100"] = _alternating_swaps(url, _subjects(url, deltas, png), args.alternating, args.steps)
    return out


@contextlib.contextmanager
def _single_node(args, data: Path):
    """``profusion-rt serve`` in a child process on a free loopback port; yields its URL once /healthz is 200."""
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "profusion_rt", "serve", "--model", args.model, "--threads", str(args.threads),
           "--port", str(port), "--data", str(data), "--max-queue", "64", "--max-batch", "4", "--max-wait-ms", "10",
           "--default-steps", str(args.steps), "--warmup-steps", "1", "--log-level", "warning"]
    child = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the single-node server did not start")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        child.terminate()
        child.wait(60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests", type=int, default=32, help="requests per client count")
    p.add_argument("--alternating", type=int, default=20, help="requests of the two-subject swap count")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per runtime (per replica)")
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="profusion-scale-"))
    png = _reference_png()
    config = ServeConfig(data_dir=work / "local", max_queue=64, max_batch=4, max_wait_ms=10, steps_limit=50,
                         default_steps=args.steps, warmup_steps=1)
    pipe = ProFusionPipeline.load(args.model, seed=0)
    pipe.progress_bar = False
    deltas = _deltas(pipe, work)
    results: dict[str, Any] = {"machine": f"{cpu_model()}, {os.cpu_count()} cores", "python": platform.python_version(),
                               "model": args.model, "steps": args.steps, "replicas": args.replicas}

    with _single_node(args, work / "local") as url:  # its own process, as `profusion-rt serve` runs
        results["single_node"] = _measure(url, args, png, deltas)
    # deferred: pulls in ray (the ray extra)
    from profusion_rt.serve.ray import app as ray_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray_app.connect("local", num_cpus=os.cpu_count())
    try:
        start = time.perf_counter()
        port = 8765
        ray_app.start(ModelSpec(model=args.model, threads=args.threads),
                      ScaleSpec(replicas=args.replicas, subjects_per_replica=1, num_cpus=0,
                                max_queued_requests=64),
                      config, str(work / "ray"), port=port)
        results["ray_ready_s"] = time.perf_counter() - start
        results["ray"] = _measure(f"http://127.0.0.1:{port}", args, png, deltas)
    finally:
        ray_app.stop()
    one = {e: next(x for x in results[e]["load"] if x["clients"] == 1) for e in ("single_node", "ray")
           if any(x["clients"] == 1 for x in results[e]["load"])}
    if len(one) == 2:
        results["ray_overhead_1_client"] = one["ray"]["p50_s"] / one["single_node"]["p50_s"] - 1
    print(f"machine: {results['machine']}; model {args.model}, {args.steps} step(s); Ray: {args.replicas} replicas")
    print("| engine | clients | images/s | p50 s | p95 s |\n|---|---|---|---|---|")
    for engine in ("single_node", "ray"):
        for row in results[engine]["load"]:
            print(f"| {engine} | {row['clients']} | {row['images_per_s']:.2f} | {row['p50_s']:.3f} | {row['p95_s']:.3f} |")
    for engine in ("single_node", "ray"):
        print(f"swaps per 100 alternating requests, {engine}: {results[engine]['swaps_per_100']:.0f}")
    if "ray_overhead_1_client" in results:
        print(f"Ray overhead at 1 client (p50): {100 * results['ray_overhead_1_client']:+.1f}%")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
