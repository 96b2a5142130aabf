"""``profusion-rt doctor``: the command line of the doctor (arguments, checks of bad input, the printed
summary and the exit status)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from profusion_rt.benchmarks.doctor import DEFAULT_BUDGET_S, SKIPPABLE, Doctor, busy_cpu
from profusion_rt.benchmarks.doctor import __doc__ as DOCTOR_DOC
from profusion_rt.benchmarks.doctor_report import markdown, write_report

from profusion_rt.core.errors import (
    BackendUnavailableError,
    InvalidParameterError,
    OutputPathError,
)

# -- command line -----------------------------------------------------------------------------------------------
EPILOG = """examples:
  profusion-rt doctor                          # the GPU when there is one (540 s budget), else the CPU
  profusion-rt doctor --device cpu             # the tiny ladder on the CPU (CI runs this)
  profusion-rt doctor --device cpu --skip torch-compile --budget-s 120

Writes doctor.md and doctor.json into --out. Exit status 0: every executed check passed; 1: a check failed
(printed with the reason); 2: bad input. Install line for a machine without the dependencies:
  GPU with CUDA torch installed:  pip install -e '.[onnx,serve]'   (keeps the installed torch)
  CPU:                            pip install torch==2.13.0 -e '.[dev]'
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("doctor", help="check this machine: versions, a ladder of checks against eager, timings",
                              description=DOCTOR_DOC.splitlines()[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"time limit of the whole run (default {DEFAULT_BUDGET_S['cuda']:.0f} on a GPU, "
                        f"{DEFAULT_BUDGET_S['cpu']:.0f} on the CPU); checks that do not fit are reported as skipped")
    p.add_argument("--out", default="outputs/doctor", help="folder for doctor.md and doctor.json")
    p.add_argument("--skip", default="", help=f"comma-separated checks to leave out: {', '.join(SKIPPABLE)}")
    p.add_argument("--artifacts", default=None,
                   help="folder for the exported graphs (default: a temporary folder, removed afterwards)")
    p.add_argument("--timing-steps", type=int, default=10, help="DDIM steps of the tiny timing request")
    p.add_argument("--timing-repeats", type=int, default=None, help="timed calls per backend (default 2 CPU, 3 GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.set_defaults(handler=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InvalidParameterError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise InvalidParameterError(f"--device must be cpu or cuda[:N], got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError("--device cuda: no CUDA GPU is available here (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BackendUnavailableError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    kind = dev.type
    budget = DEFAULT_BUDGET_S[kind] if args.budget_s is None else args.budget_s
    if not (isinstance(budget, float) and math.isfinite(budget) and budget > 0):
        raise InvalidParameterError(f"--budget-s must be a positive number of seconds, got {args.budget_s}")
    skip = [s.strip() for s in args.skip.split(",") if s.strip()]
    unknown = [s for s in skip if s not in SKIPPABLE]
    if unknown:
        raise InvalidParameterError(f"unknown check(s) in --skip: {', '.join(unknown)}; choose from {', '.join(SKIPPABLE)}")
    repeats = args.timing_repeats if args.timing_repeats is not None else (3 if kind == "cuda" else 2)
    for name, value in (("--timing-steps", args.timing_steps), ("--timing-repeats", repeats)):
        if value < 1:
            raise InvalidParameterError(f"{name} must be a positive integer, got {value}")
    if args.threads is not None:
        if args.threads < 1:
            raise InvalidParameterError(f"--threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    elif kind == "cpu" and busy_cpu() and torch.get_num_threads() > 1:
        # torch's OpenMP pool on oversubscribed cores runs many times slower than one thread
        load, cores = busy_cpu()
        torch.set_num_threads(1)
        print(f"busy CPU (load average {load:.1f} on {cores} cores): 1 torch thread (--threads N to choose)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"--out {out} exists and is not a folder")
    artifacts = None if args.artifacts is None else Path(args.artifacts)

    doctor = Doctor(str(dev), budget, out, skip=skip, artifacts=artifacts, timing_steps=args.timing_steps,
                    timing_repeats=repeats, log=lambda line: print(line, flush=True))
    report = doctor.run()
    files = write_report(report, out)
    print()
    if report["timing"]:
        print(markdown(report).split("## Timing", 1)[1].split("\n", 1)[1].strip())
        print()
    ran = [c for c in report["checks"] if c["status"] in ("passed", "failed")]
    skipped = [c for c in report["checks"] if c["status"] == "skipped"]
    print(f"wrote {', '.join(str(f) for f in files)} ({report['elapsed_s']:.0f} s)")
    if report["failed"]:
        print(f"FAILED: {report['failed']['check']}: {report['failed']['reason']}")
        return 1
    print(f"doctor: {len(ran)} check(s) passed, {len(skipped)} skipped"
          + (f" ({', '.join(c['name'] + ': ' + c['reason'] for c in skipped)})" if skipped else ""))
    return 0
