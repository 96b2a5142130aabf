"""The GPU benchmark (not a test): the suite at SD2-base shapes with random weights, fp16, within a time budget.

Rows, each in its own process, cheapest first so that a short ``--budget-s`` still yields the core
comparison: eager fp32 (the parity reference), eager fp16 (the speed reference), fused stages (torch), fused
stages + CUDA graph, torch.compile, torch.compile + CUDA graph; onnxruntime and TensorRT rows say why they
are skipped when their libraries are missing. Parity is PSNR (and latent max relative error) against the fp32
eager run. ``python -m profusion_rt.benchmarks.gpu_suite --out DIR --budget-s 420``; without CUDA it prints a
message and exits 0 (``--device cpu --model tiny`` dry-runs it). Setting up a GPU machine for it:
benchmarks/README.md, "The GPU run".
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from profusion_rt.benchmarks.suite import SuiteConfig, run_suite


def config(args: argparse.Namespace):
    steps = args.steps
    return SuiteConfig.full(
        model=args.model, device=args.device, dtype=args.dtype, reference_dtype=args.reference_dtype,
        steps=steps, warmup=1, repeats=args.repeats, threads=None, with_compile=not args.no_compile,
        backends=("eager", "torch", "cuda-graph", "torch-compile", "torch-compile+cuda-graph", "onnxruntime",
                  "tensorrt"),
        stages={"warmup": 3, "repeats": 10},
        compare={"steps": args.compare_steps, "warmup": 0, "repeats": 2, "fusion_steps": [0, 1, 2],
                 "official_fusion_steps": [1]},
        scaling={"backends": ["cuda-graph" if args.device.startswith("cuda") else "torch"], "batch": [1, 2, 4],
                 "steps": [10, 20, 50], "resolution": args.resolutions, "base_steps": 20, "warmup": 0,
                 "repeats": 2},
        out=Path(args.out), runs_dir=Path(args.runs_dir), budget_s=args.budget_s, worker_timeout_s=300.0,
        plots=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="results folder (e.g. $OUT/gpu on the device machine)")
    parser.add_argument("--runs-dir", default="/tmp/profusion-bench-runs", help="per-process outputs (npz)")
    parser.add_argument("--model", default="sd2-base")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--reference-dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--compare-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resolutions", type=lambda s: [int(x) for x in s.split(",") if x], default=[512, 768],
                        help="comma-separated resolutions of the scaling sweep")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="start no worker after this many seconds (keep the whole call under 8 minutes)")
    args = parser.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("skipped: no CUDA GPU available (this script benchmarks SD2-base shapes on a GPU)")
        return 0
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}, CUDA {torch.version.cuda}",
              flush=True)

    start = time.perf_counter()
    results = run_suite(config(args), log=lambda line: print(line, flush=True))
    out = Path(args.out)
    print()
    print((out / "results.md").read_text())
    print(f"gpu_suite finished in {time.perf_counter() - start:.0f} s")
    return 0 if all(r.get("ok") or not str(r.get("reason", "")).startswith("failed") for r in results["e2e"]) else 1


if __name__ == "__main__":
    sys.exit(main())
