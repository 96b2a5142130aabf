"""Measure export time, peak memory and artifact sizes for one preset (random weights), one graph per
process: ``python -m profusion_rt.export.measure --preset sd2-base --graphs unet,fusion_stage --out /tmp/sd2``.

Not a test: full-size graphs take minutes and gigabytes. To keep the peak memory down, the networks a
graph does not use are moved to the meta device after the model hash is computed, and a watchdog ends
the process if the machine's available memory falls below ``--min-free-gb``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

from profusion_rt.export.cache import ArtifactBuilder, ExportOptions

from profusion_rt.artifacts.store import model_hash
from profusion_rt.pipeline import ProFusionPipeline

USES = {
    "text_encoder": {"text_encoder"},
    "text_encoder_placeholder": {"text_encoder"},
    "image_encoder": {"image_encoder"},
    "vae_encoder": {"vae"},
    "vae_decoder": {"vae"},
    "promptnet": {"promptnet"},
    "unet": {"unet"},
    "fusion_stage": {"unet", "text_encoder", "promptnet"},
    "refinement_stage": {"unet", "text_encoder", "promptnet"},
}


def _available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024**2
    return float("inf")


def _watchdog(min_free_gb: float) -> None:
    def run():
        while True:
            if _available_gb() < min_free_gb:
                print(f"ABORT: less than {min_free_gb} GB available", file=sys.stderr, flush=True)
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=run, daemon=True).start()


def measure_one(args) -> dict:
    import torch

    _watchdog(args.min_free_gb)
    t0 = time.perf_counter()
    pipe = ProFusionPipeline.from_preset(args.preset, seed=0)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    digest = model_hash(pipe)
    hash_s = time.perf_counter() - t0
    for name in ("unet", "vae", "text_encoder", "image_encoder", "promptnet"):
        if name not in USES[args.graph]:
            setattr(pipe, name, getattr(pipe, name).to("meta"))
    options = ExportOptions(precision=args.precision, exporter=args.exporter, validate=args.validate,
                            batch=args.batch)
    t0 = time.perf_counter()
    builder = ArtifactBuilder(pipe, args.out, options, model_hash_=digest)
    report = builder.run([args.graph], progress=False, strict=False)[0]
    total_s = time.perf_counter() - t0
    return {
        "preset": args.preset, "graph": args.graph, "precision": args.precision, "exporter": args.exporter,
        "batch": args.batch, "build_pipeline_s": round(build_s, 1), "model_hash_s": round(hash_s, 1),
        "stages": report.stages, "stage_seconds": {k: round(v, 1) for k, v in report.seconds.items()},
        "total_s": round(total_s, 1), "sizes_mb": {k: round(v / 1e6, 1) for k, v in report.sizes.items()},
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
        "checks": [{k: c[k] for k in ("batch", "output", "max_abs", "max_ref", "ratio", "passed")} for c in report.checks],
        "torch_threads": torch.get_num_threads(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="sd2-base")
    p.add_argument("--graphs", default="unet,fusion_stage")
    p.add_argument("--graph", default=None, help=argparse.SUPPRESS)  # one graph, in a child process
    p.add_argument("--out", default="/tmp/profusion-measure")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--exporter", default="dynamo")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--validate", action="store_true")
    p.add_argument("--min-free-gb", type=float, default=1.5)
    p.add_argument("--json", default=None, help="append results to this JSON-lines file")
    args = p.parse_args(argv)
    if args.graph:
        result = measure_one(args)
        print(json.dumps(result), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")
        return 0
    rc = 0
    for graph in args.graphs.split(","):
        cmd = [sys.executable, "-m", "profusion_rt.export.measure", *(argv or sys.argv[1:]), "--graph", graph]
        rc |= subprocess.call(cmd)
    return rc


if __name__ == "__main__":
    sys.exit(main())
