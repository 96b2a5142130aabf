"""Load check of the HTTP server: latency percentiles and throughput at several client concurrencies.

    python -m profusion_rt.serve.load --concurrency 1,4,16 --steps 10            # starts a tiny server here
    python -m profusion_rt.serve.load --url http://127.0.0.1:8000 --concurrency 1,4,16

Each client sends its requests one after the other (a new one as soon as the last is answered), each with
its own seed, the same reference image and sampling parameters (so the server can batch them). Per level:
``--requests`` requests in all (default 2 per client, at least 8), after ``--warmup`` requests that are not
counted. Reports p50/p95/max latency, throughput (images/s), the mean runtime batch size the server
reported (``X-Batch-Size``) and the error count, as a Markdown table (and JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from profusion_rt.core.presets import announce_random_weights
from profusion_rt.core.samples import demo_reference_image
from profusion_rt.pipeline import ProFusionPipeline
from profusion_rt.runtime import create_runtime
from profusion_rt.serve.config import ServeConfig


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    throughput_rps: float
    p50_s: float
    p95_s: float
    max_s: float
    mean_batch: float


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def reference_image_png() -> bytes:
    buf = io.BytesIO()
    demo_reference_image().save(buf, format="PNG")
    return buf.getvalue()


async def run_level(url: str, concurrency: int, total: int, fields: dict[str, str], image: bytes,
                    seed0: int, timeout: float) -> LevelResult:
    import httpx

    latencies: list[float] = []
    batches: list[int] = []
    errors = 0
    counter = iter(range(total))

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in counter:
            data = dict(fields, seed=str(seed0 + i))
            start = time.perf_counter()
            try:
                r = await c.post("/v1/generate", files={"image": ("ref.png", image, "image/png")}, data=data)
            except httpx.HTTPError:
                errors += 1
                continue
            if r.status_code != 200:
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)
            batches.append(int(r.headers.get("x-batch-size", "1")))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as c:
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    done = len(latencies)
    return LevelResult(concurrency, done, errors, seconds, done / seconds if seconds else 0.0,
                       percentile(latencies, 50), percentile(latencies, 95), max(latencies, default=float("nan")),
                       statistics.fmean(batches) if batches else float("nan"))


def table(results: list[LevelResult]) -> str:
    lines = ["| clients | requests | errors | p50 latency (s) | p95 latency (s) | max (s) | throughput (img/s) "
             "| mean batch |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r.concurrency} | {r.requests} | {r.errors} | {r.p50_s:.2f} | {r.p95_s:.2f} | {r.max_s:.2f} "
                     f"| {r.throughput_rps:.2f} | {r.mean_batch:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m profusion_rt.serve.load", description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="server to load; default: start one here (see --model, --backend)")
    p.add_argument("--model", default="tiny")
    p.add_argument("--backend", default="torch")
    p.add_argument("--artifacts", default=None)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=None, help="torch threads of the in-process server")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=None, help="requests per level (default 2 per client, >= 8)")
    p.add_argument("--warmup", type=int, default=2, help="uncounted requests before the first level")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--fusion-steps", type=int, default=1)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        p.error("--concurrency needs positive integers")

    server = None
    url = args.url
    if url is None:
        import tempfile

        # deferred: the app and uvicorn pull in fastapi and uvicorn (the serve extra)
        from profusion_rt.serve.app import create_app
        from profusion_rt.serve.server import BackgroundServer  # deferred: uvicorn

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        pipe = ProFusionPipeline.load(args.model)
        pipe.progress_bar = False
        announce_random_weights(pipe)
        runtime = create_runtime(pipe, args.backend, artifacts=args.artifacts)
        config = ServeConfig(data_dir=tempfile.mkdtemp(prefix="serve-load-"), max_queue=max(levels) * 2,
                             max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, timeout_s=args.timeout,
                             steps_limit=max(args.steps, 1), default_steps=max(args.steps, 1),
                             warmup_steps=args.steps)
        server = BackgroundServer(create_app(runtime, config))
        url = server.url
    fields = {"prompt": "a {S*} wearing sunglasses", "num_inference_steps": str(args.steps),
              "fusion_steps": str(args.fusion_steps)}
    image = reference_image_png()
    results = []
    try:
        if args.warmup:
            asyncio.run(run_level(url, 1, args.warmup, fields, image, 10_000_000, args.timeout))
        for i, level in enumerate(levels):
            total = args.requests or max(8, 2 * level)
            result = asyncio.run(run_level(url, level, total, fields, image, 1000 * i, args.timeout))
            results.append(result)
            print(f"{level} client(s): p50 {result.p50_s:.2f} s, p95 {result.p95_s:.2f} s, "
                  f"{result.throughput_rps:.2f} img/s, mean batch {result.mean_batch:.2f}", file=sys.stderr,
                  flush=True)
    finally:
        if server is not None:
            server.stop()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"model {args.model}, backend {args.backend}, {args.steps} steps, fusion steps {args.fusion_steps}, "
          f"max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms; {platform.machine()} with "
          f"{os.cpu_count()} CPU(s), load average {load}")
    print(table(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "load_average": load, "results": [asdict(r) for r in results]}, fh,
                      indent=1)
    return 0 if all(r.errors == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
