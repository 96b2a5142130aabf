"""``profusion-rt bench-cpu``: real-size CPU benchmark, one precision and backend per process.

SD2-base shapes (UNet, VAE, OpenCLIP ViT-H text and vision towers, the released PromptNet) with random
weights, a few ProFusion steps (fusion stage + refinement stage each), per-step time and peak memory per
row. Rows: fp32 eager (the reference), bf16 eager, bf16 fused torch, bf16 torch.compile, fp32 onnxruntime.
Every row runs in a fresh interpreter (``python -m profusion_rt.benchmarks.cpu_realsize --worker JOB``), so peak memory
and thread pools are its own. Results: ``results.json`` and ``results.md`` in ``--out`` (default
``benchmarks/results/cpu-realsize-<cpu>/``), with the CPU model, whether it computes bf16 natively
(:func:`profusion_rt.core.hardware.bf16_support`) and the load average before and after.

Weights are built on the meta device and filled in place in the row's dtype (normal, std 1/sqrt(fan-in);
norm scales near 1, biases near 0): seconds instead of the minutes of the presets' CPU initialisation,
and no float32 copy for a bf16 row. The values are for timing only (they are not the presets' weights).

Per-step time: the wall time between consecutive ``progress_callback`` calls, after the reference was
encoded (timed apart). The first step also holds the prompt encoding and any compilation, so with
``--steps`` >= 2 the per-step figure is the median of the later steps. The VAE decode is not timed (latent
output). A row cut by ``--row-timeout-s`` or the budget reports how far it got.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from profusion_rt.benchmarks.measure import (
    load_average,
    machine_info,
    peak_rss_mb,
    versions,
)
from profusion_rt.core.dtypes import PRECISION_DTYPES
from profusion_rt.benchmarks.runner import _worker_env, failure_reason
from profusion_rt.export.cache import export_artifacts

from profusion_rt.core.errors import (
    InvalidParameterError,
    NonFiniteError,
    ProFusionError,
)
from profusion_rt.core.fsio import atomic_write_bytes, atomic_write_json
from profusion_rt.core.hardware import bf16_support, cpu_model
from profusion_rt.core.presets import get_preset
from profusion_rt.core.samples import demo_reference_image
from profusion_rt.models.factory import build_components
from profusion_rt.pipeline import ProFusionPipeline
from profusion_rt.runtime import create_runtime

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    name: str
    backend: str  # eager, torch, torch-compile, onnxruntime
    precision: str  # fp32, bf16


ROWS = (
    Row("fp32 eager", "eager", "fp32"),
    Row("bf16 eager", "eager", "bf16"),
    Row("bf16 torch (fused stages)", "torch", "bf16"),
    Row("fp32 onnxruntime", "onnxruntime", "fp32"),
    Row("bf16 torch.compile", "torch-compile", "bf16"),
)
ROW_KEYS = {"fp32-eager": 0, "bf16-eager": 1, "bf16-torch": 2, "fp32-onnxruntime": 3, "bf16-torch-compile": 4}
from profusion_rt.core.samples import DEMO_PROMPT as PROMPT

ORT_SKIP = ("skipped: exporting the SD2-base stage graphs takes many minutes and several GB on this CPU; "
            "pass --with-onnxruntime to run it")


# -- the worker (one row, in its own process) ----------------------------------------------------------

def random_pipeline(model: str, precision: str, seed: int = 0):
    """A pipeline of preset ``model`` built on the meta device and filled in place with cheap random values
    in ``precision`` (see the module docstring)."""
    import torch

    preset = get_preset(model)
    components = build_components(preset, device="meta")
    dtype = PRECISION_DTYPES[precision]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for net_name, net in components.networks().items():
            torch.nn.Module.to(net, dtype=dtype).to_empty(device="cpu")  # (diffusers' .to warns on a cast)
            for name, p in net.named_parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, float(p[0].numel()) ** -0.5, generator=g)
                else:
                    p.normal_(1.0 if name.endswith("weight") else 0.0, 0.02, generator=g)
            for name, b in net.named_buffers():
                if not name.endswith("position_ids"):
                    raise RuntimeError(f"cannot initialise buffer {net_name}.{name} from the meta device")
                b.copy_(torch.arange(b.shape[-1]).expand_as(b))
            net.eval().requires_grad_(False)
    pipe = ProFusionPipeline.from_components(components, resolution=preset.resolution, preset=preset.name)
    pipe.random_weights = True
    pipe.progress_bar = False
    return pipe


def run_row(job: dict[str, Any]) -> dict[str, Any]:
    """Build the row's pipeline (and runtime), encode the reference once, run ``job['steps']`` steps once and
    return the timings. The result file is rewritten after every phase, so a row cut by the budget still
    says how far it got."""
    import torch

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "step_s": [], "finite": True}

    def save(**update) -> None:
        result.update(update, peak_rss_mb=peak_rss_mb())
        atomic_write_json(job["result"], result)

    start = time.perf_counter()
    pipe = random_pipeline(job["model"], job["precision"], job.get("seed", 0))
    generate = pipe
    if job["backend"] != "eager":

        options = {"precision": job["precision"]} if job["backend"] == "onnxruntime" else {}
        generate = create_runtime(pipe, job["backend"], artifacts=job.get("artifacts"), **options)
    save(build_s=time.perf_counter() - start)
    start = time.perf_counter()
    with torch.no_grad():
        reference = pipe.encode_reference(demo_reference_image(), seed=0)
    save(encode_reference_s=time.perf_counter() - start)

    marks = [time.perf_counter()]

    def step_done(done, total):
        marks.append(time.perf_counter())
        save(step_s=[b - a for a, b in zip(marks[:-1], marks[1:])])

    try:
        generate(reference=reference, prompt=PROMPT, num_inference_steps=int(job["steps"]), seed=0,
                 output_type="latent", progress_callback=step_done)
    except NonFiniteError as exc:  # random weights at real size may overflow; the timings still stand
        logger.warning("%s", exc)
        result["finite"] = False
    steps = result["step_s"]
    later = sorted(steps[1:])
    save(first_step_s=steps[0] if steps else None,
         per_step_s=later[len(later) // 2] if later else (steps[0] if steps else None),
         per_step_from="median of steps 2.." if later else "step 1 (includes warm-up)", done=True)
    return result


# -- the driver ------------------------------------------------------------------------------------------

def cpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cpu"


def default_out() -> Path:
    return Path("benchmarks") / "results" / f"cpu-realsize-{cpu_slug(cpu_model())}"


def _run_worker(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "profusion_rt.benchmarks.cpu_realsize", "--worker", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_worker_env())
    except subprocess.TimeoutExpired:
        partial = Path(job["result"])
        got = json.loads(partial.read_text()) if partial.is_file() else {}
        phase = ("building the model" if "build_s" not in got else "encoding the reference"
                 if "encode_reference_s" not in got else f"in step {len(got.get('step_s', [])) + 1}")
        return {**got, "per_step_s": None,
                "status": f"cut: timed out after {timeout:.0f} s {phase}"}
    if proc.returncode != 0:
        logger.debug("row %s failed:\n%s", job["row"], proc.stderr)
        return {"status": f"failed: {failure_reason(proc.stderr, proc.returncode)}"}
    return {"status": "ok", **json.loads(Path(job["result"]).read_text())}


def _export_ort(model: str, artifacts: Path, timeout: float) -> str | None:
    """Export the two fp32 stage graphs of the row's random weights (in a child process); None when done,
    else the reason."""
    job = {"export": True, "model": model, "artifacts": str(artifacts)}

    cmd = [sys.executable, "-m", "profusion_rt.benchmarks.cpu_realsize", "--worker", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_worker_env())
    except subprocess.TimeoutExpired:
        return f"skipped: the stage-graph export timed out after {timeout:.0f} s (budget)"
    return None if proc.returncode == 0 else f"failed: export: {failure_reason(proc.stderr, proc.returncode)}"


def run_benchmark(model: str = "sd2-base", steps: int = 2, rows: list[str] | None = None,
                  out: Path | None = None, budget_s: float | None = None, threads: int | None = None,
                  with_onnxruntime: bool = False, row_timeout_s: float | None = None,
                  log=print) -> dict[str, Any]:
    """Run the rows (keys of :data:`ROW_KEYS`, default all) and write results.json and results.md."""

    if steps < 1:
        raise InvalidParameterError("--steps must be at least 1")
    names = rows or list(ROW_KEYS)
    unknown = [n for n in names if n not in ROW_KEYS]
    if unknown:
        raise InvalidParameterError(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROW_KEYS)}")
    out = Path(out) if out is not None else default_out()
    out.mkdir(parents=True, exist_ok=True)
    support = bf16_support()
    started = time.perf_counter()
    results: dict[str, Any] = {
        "what": f"{model} shapes, random weights, {steps} ProFusion steps (1 fusion + 1 refinement stage each), "
                "batch 1, one process per row",
        "model": model, "steps": steps, "machine": machine_info("cpu"),
        "bf16": {"native": support.native, "flags": list(support.flags), "describe": support.describe()},
        "versions": versions(), "load_average_before": load_average(), "budget_s": budget_s, "rows": [],
    }
    results["machine"].pop("cpu_flags", None)

    def left() -> float:
        return float("inf") if budget_s is None else budget_s - (time.perf_counter() - started)

    artifacts = out / "artifacts"
    for key in names:
        row = ROWS[ROW_KEYS[key]]
        entry: dict[str, Any] = {"row": key, "name": row.name, "backend": row.backend, "precision": row.precision}
        if row.backend == "onnxruntime" and not with_onnxruntime:
            entry["status"] = ORT_SKIP
        elif left() < 30:
            entry["status"] = "skipped: budget spent"
        else:
            reason = None
            if row.backend == "onnxruntime":
                log(f"{row.name}: exporting the stage graphs")
                reason = _export_ort(model, artifacts, min(left(), 3600.0))
            if reason is not None:
                entry["status"] = reason
            else:
                log(f"{row.name}: running")
                job = {"row": key, "model": model, "backend": row.backend, "precision": row.precision,
                       "steps": steps, "threads": threads, "result": str(out / f".{key}.json"),
                       "artifacts": str(artifacts) if row.backend == "onnxruntime" else None}
                limit = min(left(), row_timeout_s or float("inf"))
                entry.update(_run_worker(job, max(limit, 1.0) if limit != float("inf") else 7200.0))
                Path(job["result"]).unlink(missing_ok=True)
        log(f"{row.name}: {entry['status']}" + (f", {entry['per_step_s']:.2f} s per step"
                                                  if entry.get("per_step_s") else ""))
        results["rows"].append(entry)
    results["load_average_after"] = load_average()
    results["wall_s"] = time.perf_counter() - started
    atomic_write_json(out / "results.json", results)
    atomic_write_bytes(out / "results.md", markdown(results).encode())
    results["files"] = [str(out / "results.json"), str(out / "results.md")]
    return results


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    bf16 = results["bf16"]
    ref = next((r.get("per_step_s") for r in results["rows"] if r["row"] == "fp32-eager"), None)
    lines = [
        f"# Real-size CPU benchmark ({results['model']})", "",
        f"Machine: {m['cpu']}, {m['cpus']} cores, {m.get('memory_gib')} GiB; {bf16['describe']}.",
        f"Load average before / after: {results['load_average_before']} / {results['load_average_after']} "
        "(a shared machine: other jobs ran at the same time).",
        f"{results['what']}; torch {results['versions'].get('torch')}.", "",
    ]
    if not bf16["native"]:
        lines += ["**This CPU has no native bf16 (no AMX, no avx512_bf16): torch emulates bf16 here, so the bf16 "
                  "rows show the cost of emulation, not what bf16 gives on a CPU that has it.**", ""]
    lines += ["| row | per step (s) | vs fp32 eager | first step (s) | reference encoding (s) | build (s) | "
              "peak RSS (GiB) | finite | status |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    def num(value, fmt):
        return format(value, fmt) if isinstance(value, (int, float)) else ""

    for r in results["rows"]:
        per = r.get("per_step_s")
        speed = f"{ref / per:.2f}x" if per and ref else ""
        finite = "" if "finite" not in r or not r.get("done") else "yes" if r["finite"] else "no (random weights overflowed)"
        rss = r.get("peak_rss_mb")
        lines.append(f"| {r['name']} | {num(per, '.2f')} | {speed} | {num(r.get('first_step_s'), '.2f')} | "
                     f"{num(r.get('encode_reference_s'), '.1f')} | {num(r.get('build_s'), '.1f')} | "
                     f"{num(rss / 1024 if rss else None, '.1f')} | {finite} | {r['status']} |")
    lines += ["", "Per step: median of the steps after the first (the first also holds the prompt encoding and any "
              "compilation; with one step, that step). Peak RSS: the row's process high-water mark.", ""]
    return "\n".join(lines)


# -- command line -----------------------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser("bench-cpu", help="real-size (SD2-base) CPU benchmark: fp32 vs bf16 per backend, "
                              "per-step time and peak memory (JSON + Markdown)", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd2-base", help="preset (sd2-base; tiny for a quick check)")
    p.add_argument("--steps", type=int, default=2,
                   help="ProFusion steps per row (with 2 or more the first is not counted)")
    p.add_argument("--row-timeout-s", type=float, default=None,
                   help="cut a row after this many seconds (it reports how far it got)")
    p.add_argument("--rows", default=None, help=f"comma-separated subset of {', '.join(ROW_KEYS)} (default: all)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting rows after this many seconds; a running row is cut at the budget")
    p.add_argument("--threads", type=int, default=None, help="torch threads per row (default: all cores)")
    p.add_argument("--with-onnxruntime", action="store_true",
                   help="export the stage graphs and run the fp32 onnxruntime row (minutes and GBs at SD2-base)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/cpu-realsize-<cpu>)")
    p.set_defaults(handler=cmd_bench_cpu)


def cmd_bench_cpu(args: argparse.Namespace) -> int:
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None
    results = run_benchmark(args.model, args.steps, rows, Path(args.out) if args.out else None, args.budget_s,
                            args.threads, args.with_onnxruntime, args.row_timeout_s, log=lambda line: print(line, flush=True))
    print()
    print(markdown(results))
    return 1 if any(r["status"].startswith("failed") for r in results["rows"]) else 0


def _worker_main(job: dict[str, Any]) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if job.get("export"):

            pipe = random_pipeline(job["model"], "fp32")
            export_artifacts(pipe, job["artifacts"], graphs=["fusion_stage", "refinement_stage"], validate=False)
            return 0
        atomic_write_json(job["result"], run_row(job))
    except ProFusionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # a worker process of ``profusion-rt bench-cpu``
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        sys.exit("usage: profusion-rt bench-cpu ... (this module runs the rows as `--worker JOB`)")
    sys.exit(_worker_main(json.loads(sys.argv[2])))
