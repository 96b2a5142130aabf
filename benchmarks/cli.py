"""``profusion-rt bench``: the benchmark suite against eager PyTorch."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from profusion_rt.benchmarks.doctor_cli import register as register_doctor
from profusion_rt.benchmarks.suite import SuiteConfig, run_suite

from profusion_rt.core.errors import InvalidParameterError

EPILOG = """examples:
  profusion-rt bench --quick                      # tiny preset on the CPU, about 2 minutes on 2 cores
  profusion-rt bench --quick --with-compile       # also torch.compile (minutes of compilation on a CPU)
  profusion-rt bench --full                       # SD2-base shapes, fp16 on a GPU (python -m profusion_rt.benchmarks.gpu_suite)
  profusion-rt bench --quick --backends eager,torch --steps 4 --repeats 2 --out /tmp/bench

Writes results.json (machine, versions, config, every sample), results.md (tables), PNG plots and
snippet.md (README excerpt) into --out (default benchmarks/results/<machine-tag>/).
"""

BACKEND_CHOICES = ("eager", "torch", "torch-compile", "cuda-graph", "torch-compile+cuda-graph", "onnxruntime",
                   "tensorrt")


def add_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="tiny preset on the CPU, 10 steps (default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="sd2-base shapes, 50 steps, fp16 on CUDA (for a GPU)")
    p.set_defaults(mode="quick")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/<machine-tag>)")
    p.add_argument("--backends", default=None,
                   help=f"comma-separated rows to run (default all): {', '.join(BACKEND_CHOICES)}")
    p.add_argument("--with-compile", action="store_true", help="include torch.compile rows in --quick")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    p.add_argument("--model", default=None, help="preset (tiny, sd2-base, sd2-768) or model folder")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the mode's)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    p.add_argument("--reference-dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="eager run in this dtype used as the parity reference (--full: fp32)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps of the end-to-end runs")
    p.add_argument("--fusion-steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="images per request")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per backend")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls after the (untimed) first call")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads per worker (--quick default 1: torch's pool oversubscribes shared cores; "
                        "0 = library default)")
    p.add_argument("--no-stages", action="store_true", help="skip the per-stage micro-benchmarks")
    p.add_argument("--no-compare", action="store_true", help="skip the sampling-mode comparisons")
    p.add_argument("--no-scaling", action="store_true", help="skip the scaling sweeps")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots")
    p.add_argument("--artifacts", default=None, help="ONNX artifact cache (default outputs/bench/artifacts)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no worker after this many seconds (remaining rows: skipped)")
    p.add_argument("--snippet", default=None,
                   help="also copy snippet.md here (the committed one: benchmarks/results/README_SNIPPET.md)")


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmark every backend against eager PyTorch (JSON, Markdown, plots)",
                              description=__doc__.splitlines()[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(handler=cmd_bench)

    register_doctor(subparsers)  # profusion-rt doctor (benchmarks/doctor.py)


def config_from_args(args: argparse.Namespace):
    overrides = {}
    for key in ("model", "device", "dtype", "reference_dtype", "steps", "fusion_steps", "batch", "repeats",
                "warmup", "compile_mode", "budget_s"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    if args.threads is not None:
        overrides["threads"] = args.threads or None
    if args.with_compile:
        overrides["with_compile"] = True
    if args.backends:
        names = tuple(b.strip() for b in args.backends.split(",") if b.strip())
        unknown = [b for b in names if b not in BACKEND_CHOICES]
        if unknown:
            raise InvalidParameterError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKEND_CHOICES)}")
        if "eager" not in names:
            names = ("eager",) + names  # the reference every ratio needs
        overrides["backends"] = names
    if args.out:
        overrides["out"] = Path(args.out)
    if args.artifacts:
        overrides["artifacts"] = Path(args.artifacts)
    if args.no_plots:
        overrides["plots"] = False
    for flag, key in (("no_stages", "stages"), ("no_compare", "compare"), ("no_scaling", "scaling")):
        if getattr(args, flag):
            overrides[key] = None
    for key in ("steps", "repeats", "batch", "fusion_steps"):
        if key in overrides and (not isinstance(overrides[key], int) or overrides[key] < (0 if key == "fusion_steps" else 1)):
            raise InvalidParameterError(f"--{key.replace('_', '-')} must be a positive integer")
    cfg = SuiteConfig.full(**overrides) if args.mode == "full" else SuiteConfig.quick(**overrides)
    return cfg


def cmd_bench(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if cfg.mode == "full" and cfg.device == "cpu":
        print("warning: --full on the CPU runs SD2-base shapes in fp32: expect hours; use --quick here",
              file=sys.stderr)
    results = run_suite(cfg, log=lambda line: print(line, flush=True))
    out = Path(results["files"][0]).parent
    if args.snippet:
        shutil.copyfile(out / "snippet.md", args.snippet)
        print(f"snippet copied to {args.snippet}")
    print()
    print((out / "results.md").read_text().split("## End to end", 1)[-1].split("## ", 1)[0].strip())
    failed = [r["name"] for r in results["e2e"] if not r.get("ok") and str(r.get("reason", "")).startswith("failed")]
    return 1 if failed else 0
