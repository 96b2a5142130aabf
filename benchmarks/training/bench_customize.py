"""Benchmark (not a test): the default single-image customization on the tiny preset, on this machine.

Default run: the photo + 31 augmentations (border fill), 100 iterations at batch 4, lr 2e-5, fp32 on the
CPU, outputs (full model folder + delta) written to a temporary folder. Prints the wall time of each phase
and of the whole job (the model build is reported separately: it is not part of customizing).

    python -m profusion_rt.benchmarks.training.bench_customize [--threads N] [--steps 100] [--repeats 1]

On a shared machine use ``--threads 1``: torch's thread pool oversubscribes busy cores badly.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import tempfile
import time

from profusion_rt.pipeline import ProFusionPipeline
from profusion_rt.training import TrainConfig, customize


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    import torch
    from skimage import data as skdata

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    base = ProFusionPipeline.from_preset("tiny", seed=0)
    build = time.perf_counter() - start
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"tiny preset built in {build:.1f} s (not counted)")
    totals = []
    for i in range(args.repeats):
        pipe = copy.deepcopy(base)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = customize(pipe, skdata.astronaut(), os.path.join(tmp, "out"), steps=args.steps,
                               config=TrainConfig.customization(batch_size=args.batch_size), progress=False)
            total = time.perf_counter() - start
        totals.append(total)
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items())
        per_step = result.timings["train"] / args.steps
        print(f"run {i + 1}: customization {total:.1f} s ({phases}; {per_step:.3f} s per iteration); "
              f"loss {result.train.losses[0]:.4f} -> {result.train.losses[-1]:.4f}")
    print(f"default customization on tiny ({args.steps} iterations, batch {args.batch_size}, 31 augmentations): "
          f"median {statistics.median(totals):.1f} s over {len(totals)} run(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
