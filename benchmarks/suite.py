"""The benchmark suite: every backend in its own process against the eager reference, per stage and end
to end, the ProFusion-specific comparisons, scaling, FLOP/s and utilization; JSON + Markdown + PNG plots.

``run_suite(SuiteConfig.quick())`` is ``profusion-rt bench --quick``; :class:`SuiteConfig` holds every
knob. The orchestrating process does no timing itself: it counts FLOPs on the meta device, exports the
ONNX artifacts the onnxruntime row needs, then starts one ``benchmarks.worker --serve`` process per backend
(torch's and onnxruntime's thread pools never share a process) and drives them so that only one is active
at a time: every backend's untimed first call, the warm-up calls, then the timed calls round by round in
rotating order (slow drift of a shared machine then hits every backend alike, and the ratios against
eager compare runs minutes apart at most), then each worker's own tasks (peak FLOP/s, stages,
comparisons, scaling). Ratios, FLOP/s and parity are derived from what the workers report.

Artifacts (onnxruntime, TensorRT rows): exported in a child process of its own, under the time budget
(killed when the budget runs out, the rows then say why), before any worker starts. One rule for
precision and model hash: artifacts are matched by the hash of the float32 weights, so the export and the
artifact rows' workers always load the pipeline in float32; the precision of the engines is separate
(:func:`artifact_precision`: onnxruntime fp32, TensorRT the suite's dtype).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from profusion_rt.benchmarks.costs import NetworkFlops, achieved, unet_evals_per_step
from profusion_rt.benchmarks.measure import (
    load_average,
    machine_info,
    machine_tag,
    versions,
)

logger = logging.getLogger(__name__)

#: default output folders are relative to the working directory
ROOT = Path(".")
from profusion_rt.benchmarks.models import build_pipeline
from profusion_rt.benchmarks.report import write_all, write_json
from profusion_rt.benchmarks.runner import WorkerPool
from profusion_rt.export.cache import export_artifacts

from profusion_rt.core.presets import get_preset, preset_names
from profusion_rt.core.samples import DEMO_PROMPT
from profusion_rt.runtime.parity import compare

#: Every row of the end-to-end table, in order: name -> how the worker runs it.
BACKEND_ROWS: dict[str, dict[str, Any]] = {
    "eager": {"backend": "eager", "what": "reference pipeline, unfused eager PyTorch"},
    "torch": {"backend": "torch", "use_cuda_graph": False, "what": "fused stage modules, eager PyTorch"},
    "torch-compile": {"backend": "torch-compile", "use_cuda_graph": False, "what": "fused stages, torch.compile"},
    "cuda-graph": {"backend": "torch", "use_cuda_graph": True,
                   "what": "fused eager stages, whole loop replayed as one CUDA graph"},
    "torch-compile+cuda-graph": {"backend": "torch-compile", "use_cuda_graph": True,
                                 "what": "torch.compile stages inside one captured CUDA graph"},
    "onnxruntime": {"backend": "onnxruntime", "what": "exported fused stage graphs, onnxruntime"},
    "tensorrt": {"backend": "tensorrt", "what": "TensorRT plans of the fused stage graphs"},
}
BACKEND_ORDER = tuple(BACKEND_ROWS)
#: The order the workers run in: compilation is the slowest to start, so a time budget cuts it first.
RUN_ORDER = ("eager", "torch", "cuda-graph", "onnxruntime", "tensorrt", "torch-compile", "torch-compile+cuda-graph")
NOT_SELECTED = "not selected (--backends)"
STAGE_GRAPHS = ("vae_encoder", "image_encoder", "text_encoder", "promptnet", "unet", "fusion_stage",
                "refinement_stage", "vae_decoder")


@dataclass
class SuiteConfig:
    mode: str = "quick"
    model: str = "tiny"
    device: str = "cpu"
    dtype: str = "fp32"
    #: eager run in this dtype used as the parity reference (e.g. fp32 when ``dtype`` is fp16)
    reference_dtype: str | None = None
    steps: int = 10
    fusion_steps: int = 1
    batch: int = 1
    seed: int = 0
    prompt: str = DEMO_PROMPT
    #: untimed calls after the first call (which is always untimed and reported as "first call")
    warmup: int = 0
    repeats: int = 4
    #: torch (and onnxruntime) intra-op threads in every worker; None: the library default
    threads: int | None = 1
    backends: tuple[str, ...] = BACKEND_ORDER
    with_compile: bool = False
    compile_mode: str | None = None
    #: per-graph micro-benchmarks (None: skipped)
    stages: dict[str, Any] | None = field(default_factory=lambda: {"warmup": 2, "repeats": 5})
    #: sampling-mode comparisons (None: skipped)
    compare: dict[str, Any] | None = field(default_factory=lambda: {
        "steps": 4, "warmup": 0, "repeats": 3, "fusion_steps": [0, 1, 2], "official_fusion_steps": [1]})
    #: scaling sweeps, run by the listed backends (None: skipped)
    scaling: dict[str, Any] | None = field(default_factory=lambda: {
        "backends": ["torch"], "batch": [1, 2, 4], "steps": [3, 6, 12], "resolution": [128, 256, 384],
        "base_steps": 3, "warmup": 0, "repeats": 2})
    #: graphs exported for onnxruntime (the two stage graphs always); --quick leaves out the image encoder,
    #: the slowest to export
    export_graphs: tuple[str, ...] = tuple(g for g in STAGE_GRAPHS if g != "image_encoder")
    out: Path | None = None
    artifacts: Path = ROOT / "outputs" / "bench" / "artifacts"
    runs_dir: Path = ROOT / "outputs" / "bench" / "runs"
    plots: bool = True
    #: stop starting workers after this many seconds (rows left are reported as skipped)
    budget_s: float | None = None
    worker_timeout_s: float = 1800.0

    @classmethod
    def quick(cls, **overrides) -> "SuiteConfig":
        """The tiny preset on the CPU: about 2 minutes on 2 cores (more under load; the first run also
        exports the ONNX graphs, cached afterwards)."""
        return cls(**overrides)

    @classmethod
    def full(cls, **overrides) -> "SuiteConfig":
        """SD2-base shapes (random weights), for a GPU: fp16 against an fp32 eager parity reference,
        50 steps, torch.compile and CUDA graphs included."""
        import torch

        cuda = torch.cuda.is_available()
        best = "torch-compile+cuda-graph" if cuda else "torch"
        base = dict(
            mode="full", model="sd2-base", device="cuda" if cuda else "cpu", dtype="fp16" if cuda else "fp32",
            reference_dtype="fp32" if cuda else None, steps=50, warmup=1, repeats=5,
            threads=None, with_compile=True, export_graphs=STAGE_GRAPHS,
            stages={"warmup": 3, "repeats": 20},
            compare={"steps": 50, "warmup": 0, "repeats": 3, "fusion_steps": [0, 1, 2],
                     "official_fusion_steps": [1, 2]},
            scaling={"backends": ["eager", best], "batch": [1, 2, 4, 8], "steps": [10, 25, 50],
                     "resolution": [512, 768], "base_steps": 25, "warmup": 0, "repeats": 3},
        )
        base.update(overrides)
        return cls(**base)

    def request(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "num_inference_steps": self.steps, "fusion_steps": self.fusion_steps,
                "seed": self.seed, "num_images_per_prompt": self.batch, "reference": "demo"}

    def to_json(self) -> dict[str, Any]:
        return {k: (_rel(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def _rel(path: Path) -> str:
    """``path`` relative to the repository when inside it (results stay comparable across checkouts)."""
    try:
        return Path(path).resolve().relative_to(ROOT.resolve()).as_posix()
    except ValueError:
        return str(path)


# -- which rows can run here ---------------------------------------------------------------------------
def row_reasons(cfg: SuiteConfig) -> dict[str, str]:
    """Row name -> "" when it runs here, else why not (shown in the table as "skipped: <reason>")."""
    import torch

    cuda = torch.device(cfg.device).type == "cuda"
    out: dict[str, str] = {}
    for name in BACKEND_ORDER:
        reason = ""
        if name not in cfg.backends:
            reason = NOT_SELECTED
        elif name in ("cuda-graph", "torch-compile+cuda-graph") and not cuda:
            reason = "needs CUDA"
        elif name.startswith("torch-compile") and not cfg.with_compile:
            reason = "--with-compile not given"
        elif name == "onnxruntime":
            try:
                import onnxruntime as ort

                if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
                    reason = "onnxruntime has no CUDA provider here (onnxruntime-gpu not installed)"
            except ImportError:
                reason = "onnxruntime not installed"
        elif name == "tensorrt":
            try:
                import tensorrt  # noqa: F401

                if not cuda:
                    reason = "needs CUDA"
            except ImportError:
                reason = "TensorRT not installed"
        out[name] = reason
    return out


# -- export ----------------------------------------------------------------------------------------------
def artifact_precision(cfg: SuiteConfig, backend: str) -> str:
    """The precision of the artifacts a row runs: onnxruntime fp32 (the CPU-tested path), TensorRT the
    suite's dtype (fp16 in the GPU suite). Whatever it is, the pipeline behind the row is float32: artifacts
    are matched by the float32 weights' hash (``profusion_rt.runtime.backends.artifact_model_hash``)."""
    return cfg.dtype if backend == "tensorrt" else "fp32"


def export_for(cfg: SuiteConfig, reasons: dict[str, str], timeout_s: float | None = None) -> dict[str, Any]:
    """Export (or find in the cache) the graphs the onnxruntime / tensorrt rows need, in a child process of
    its own that is killed after ``timeout_s`` (the suite's remaining budget); on failure or timeout those
    rows are marked skipped with the reason."""
    need_ort = not reasons.get("onnxruntime")
    need_trt = not reasons.get("tensorrt")
    if not (need_ort or need_trt):
        return {"status": "not needed"}
    import contextlib
    import multiprocessing
    import queue as queue_module

    start = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")  # a fresh process: no CUDA context inherited, memory freed after
    queue = ctx.Queue()
    proc = ctx.Process(target=_export_child, args=(cfg, dict(reasons), queue), name="bench-export", daemon=True)
    proc.start()
    end = None if timeout_s is None else time.monotonic() + timeout_s
    result = None
    try:
        while result is None:
            try:
                result = queue.get(timeout=1.0)
            except queue_module.Empty:
                if not proc.is_alive():  # a last look: it may have answered just before exiting
                    with contextlib.suppress(queue_module.Empty):
                        result = queue.get(timeout=1.0)
                    break
                if end is not None and time.monotonic() > end:
                    break
        if result is not None:
            info, child_reasons = result
            reasons.update(child_reasons)
        else:
            why = (f"export did not finish within the time budget ({timeout_s:.0f} s)" if proc.is_alive()
                   else f"export process died (exit code {proc.exitcode})")
            info = {"root": _rel(cfg.artifacts), "graphs": {}, "status": f"failed: {why}"}
            for name in ("onnxruntime", "tensorrt"):
                if not reasons.get(name):
                    reasons[name] = why
    finally:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    info["seconds"] = time.perf_counter() - start
    return info


def _export_child(cfg: SuiteConfig, reasons: dict[str, str], queue) -> None:
    queue.put(_export(cfg, reasons))


def _export(cfg: SuiteConfig, reasons: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(info, reasons) after exporting what the rows need (runs in the export process)."""
    need_ort = not reasons.get("onnxruntime")
    need_trt = not reasons.get("tensorrt")
    import torch

    info: dict[str, Any] = {"root": _rel(cfg.artifacts), "graphs": {}}
    try:
        pipe = build_pipeline(cfg.model, cfg.device, "fp32", cfg.seed)
        graphs = [g for g in cfg.export_graphs]
        for g in ("fusion_stage", "refinement_stage"):
            if g not in graphs:
                graphs.append(g)
        if need_ort:
            for rep in export_artifacts(pipe, cfg.artifacts, graphs=graphs, validate=False, batch=1,
                                        dynamic_batch=(1, 4), exporter="legacy"):
                info["graphs"][rep.graph] = {"stages": rep.stages, "seconds": rep.seconds}
        if need_trt:
            try:
                export_artifacts(pipe, cfg.artifacts, graphs=["fusion_stage", "refinement_stage"], validate=False,
                                 batch=1, dynamic_batch=(1, 4), exporter="legacy", backend="tensorrt",
                                 precision=artifact_precision(cfg, "tensorrt"))
            except Exception as exc:
                reasons["tensorrt"] = f"TensorRT build failed: {exc}".splitlines()[0][:160]
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        info["status"] = "ok"
    except Exception as exc:
        logger.warning("export failed: %s", exc)
        info["status"] = f"failed: {exc}".splitlines()[0][:200]
        for name in ("onnxruntime", "tensorrt"):
            if not reasons.get(name):
                reasons[name] = f"export failed: {exc}".splitlines()[0][:160]
    return info, reasons


# -- jobs ------------------------------------------------------------------------------------------------
def make_job(cfg: SuiteConfig, name: str, runs_dir: Path) -> dict[str, Any]:
    row = BACKEND_ROWS[name]
    job: dict[str, Any] = {
        "backend": row["backend"], "name": name, "model": cfg.model, "device": cfg.device, "dtype": cfg.dtype,
        "weights_seed": cfg.seed, "request": cfg.request(), "warmup": cfg.warmup, "repeats": cfg.repeats,
        "out": str(runs_dir), "tasks": ["e2e"],
    }
    if cfg.threads:
        job["threads"] = cfg.threads
        if row["backend"] == "onnxruntime":
            job["ort_threads"] = cfg.threads
    if "use_cuda_graph" in row:
        job["use_cuda_graph"] = row["use_cuda_graph"]
    if row["backend"] in ("onnxruntime", "tensorrt"):
        job["artifacts"] = str(cfg.artifacts)
        job["dtype"] = "fp32"  # artifacts are matched by the float32 weights' hash, whatever their precision
        job["precision"] = artifact_precision(cfg, row["backend"])
    if row["backend"].startswith("torch-compile") and cfg.compile_mode:
        job["compile_mode"] = cfg.compile_mode
    if name == "eager":
        job["tasks"] = ["peak", "e2e"]
        if cfg.compare is not None:
            job["tasks"].append("compare")
            job["compare"] = cfg.compare
    if cfg.stages is not None and name in ("eager", "onnxruntime"):
        job["tasks"].append("stages")
        job["stages"] = dict(cfg.stages, batch=cfg.batch)
    if cfg.scaling is not None and name in cfg.scaling.get("backends", []):
        job["tasks"].append("scaling")
        job["scaling"] = {k: v for k, v in cfg.scaling.items() if k != "backends"}
    return job


def run_suite(cfg: SuiteConfig, log=print) -> dict[str, Any]:
    """Run the suite and write results.json, results.md and the plots into ``cfg.out``; returns the
    results dictionary."""
    import numpy as np

    t_start = time.perf_counter()
    out = Path(cfg.out or ROOT / "benchmarks" / "results" / machine_tag(cfg.device))
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = Path(cfg.runs_dir) / out.name
    runs_dir.mkdir(parents=True, exist_ok=True)
    deadline = None if cfg.budget_s is None else time.monotonic() + cfg.budget_s
    results: dict[str, Any] = {
        "schema": 1,
        "suite": cfg.mode,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(cfg.device),
        "machine_tag": machine_tag(cfg.device),
        "versions": versions(),
        "config": cfg.to_json(),
        "resolution": _resolution(cfg.model),
        "load_average": {"start": load_average()},
    }
    log(f"bench --{cfg.mode}: {cfg.model}, {cfg.device} {cfg.dtype}, {cfg.steps} steps, fusion_steps "
        f"{cfg.fusion_steps}, batch {cfg.batch}, threads {cfg.threads or 'default'}; load average "
        f"{results['load_average']['start']} -> {out}")

    # FLOPs (meta device).
    flops = NetworkFlops.count(cfg.model)
    results["network_flops"] = flops.as_dict() if flops else None
    scaling_flops = {}
    if flops and cfg.scaling is not None:
        for res in cfg.scaling.get("resolution", []):
            nf = NetworkFlops.count(cfg.model, res)
            scaling_flops[int(res)] = nf
        results["scaling_network_flops"] = {str(k): v.as_dict() for k, v in scaling_flops.items()}

    reasons = row_reasons(cfg)
    if any(not reasons[n] for n in ("onnxruntime", "tensorrt")):
        log("exporting the ONNX graphs for onnxruntime / TensorRT in their own process (cached after the first "
            "run) ...")
    export_budget = None if deadline is None else max(deadline - time.monotonic() - 60.0, 1.0)
    results["export"] = export_for(cfg, reasons, timeout_s=export_budget)
    if results["export"].get("seconds"):
        log(f"  export: {results['export']['status']} in {results['export']['seconds']:.1f} s")

    # One worker process per backend, all loaded, only one active at a time: first calls, warm-up calls,
    # then the timed calls round by round (rotating the order), then each worker's own tasks.
    rows: dict[str, dict[str, Any]] = {}
    outputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    reference_name = "eager"
    order = list(RUN_ORDER)
    if cfg.reference_dtype and cfg.reference_dtype != cfg.dtype:
        reference_name = f"eager-{cfg.reference_dtype}"
        order.insert(0, reference_name)
    jobs: dict[str, dict[str, Any]] = {}

    def left() -> float | None:
        return None if deadline is None else deadline - time.monotonic()

    def budget_ok(need: float = 20.0) -> bool:
        remaining = left()
        return remaining is None or remaining > need

    def timeout() -> float:
        remaining = left()
        return cfg.worker_timeout_s if remaining is None else max(min(cfg.worker_timeout_s, remaining), 1.0)

    def mark(name: str, reason: str) -> None:
        rows[name].update(ok=False, reason=reason)
        log(f"  {name}: {reason}")

    def drop(name: str, reason: str) -> None:
        mark(name, reason)
        pool.discard(name)

    def keep_going(i: int) -> bool:
        if i >= 1 and not budget_ok(10):
            log(f"  time budget: stopped after {i} timed round(s)")
            return False
        return True

    with WorkerPool(lambda name, exc: mark(name, f"failed: {exc}"), timeout=timeout) as pool:
        for name in order:
            is_ref = name == reference_name and name != "eager"
            reason = "" if is_ref else reasons[name]
            if reason == NOT_SELECTED:
                continue
            what = (f"eager reference in {cfg.reference_dtype} (parity reference)" if is_ref
                    else BACKEND_ROWS[name]["what"])
            rows[name] = {"name": name, "what": what, "ok": False, "reason": reason}
            if reason:
                log(f"  {name}: skipped ({reason})")
                continue
            if not budget_ok(60):
                drop(name, "time budget exhausted")
                continue
            if is_ref:
                job = make_job(cfg, "eager", runs_dir)
                job.update(name=name, dtype=cfg.reference_dtype, tasks=["e2e"], repeats=1, warmup=0)
                for key in ("compare", "stages", "scaling"):
                    job.pop(key, None)
            else:
                job = make_job(cfg, name, runs_dir)
            jobs[name] = job
            if pool.start(name, job) is not None:
                log(f"  {name}: loaded in {pool.live[name].ready['load_s']:.1f} s")

        if "eager" in pool.live and "peak" in jobs["eager"]["tasks"]:
            pool.request("eager", {"cmd": "task", "task": "peak"})
        for name in list(pool.live):
            if not budget_ok(30):
                drop(name, "time budget exhausted")
                continue
            t = time.perf_counter()
            if pool.request(name, {"cmd": "call", "kind": "first"}):
                log(f"  {name}: first call {time.perf_counter() - t:.2f} s")
        for _ in range(max(cfg.warmup, 0)):
            for name in list(pool.live):
                pool.request(name, {"cmd": "call", "kind": "warmup"})
        rounds = max((jobs[n]["repeats"] for n in pool.live), default=0)
        pool.rounds(rounds, {"cmd": "call", "kind": "timed"}, repeats={n: jobs[n]["repeats"] for n in pool.live},
                    before_round=keep_going)
        for name in list(pool.live):
            for task in jobs[name]["tasks"]:
                if task in ("e2e", "peak") or name not in pool.live:
                    continue
                if not budget_ok(30):
                    log(f"  {name}: {task} skipped (time budget exhausted)")
                    continue
                t = time.perf_counter()
                if pool.request(name, {"cmd": "task", "task": task}):
                    log(f"  {name}: {task} in {time.perf_counter() - t:.0f} s")
        if "eager" in pool.live and "peak" in jobs["eager"]["tasks"]:
            pool.request("eager", {"cmd": "task", "task": "peak"})  # best of two
        for name in list(pool.live):
            res = pool.finish(name, timeout=max(timeout(), 60.0))
            if res is None:
                continue
            rows[name].update(ok=True, reason="", **res.result)
            outputs[name] = (res.latents, res.images)
            if res.result.get("median_s") is not None:
                log(f"  {name}: median {res.result['median_s']:.3f} s/request over {len(res.result['runs'])} runs")
            _write_progress(out, results, rows)

    display = [n for n in ([reference_name] if reference_name != "eager" else []) + list(BACKEND_ORDER) if n in rows]
    rows = {n: rows[n] for n in display}
    derive(cfg, results, rows, outputs, flops, scaling_flops, reference_name, compare)
    (out / "progress.json").unlink(missing_ok=True)
    results["load_average"]["end"] = load_average()
    results["elapsed_s"] = time.perf_counter() - t_start
    paths = write_all(results, out, plots=cfg.plots)
    results["files"] = [str(p) for p in paths]
    log(f"done in {results['elapsed_s']:.0f} s; load average {results['load_average']['end']}; wrote "
        + ", ".join(p.name for p in paths))
    return results


def _write_progress(out: Path, results: dict, rows: dict) -> None:
    """The raw worker results so far (a run cut short by a time limit keeps what it measured)."""

    write_json({**results, "partial": True, "rows": rows}, out / "progress.json")


def _resolution(model: str) -> int | None:
    return get_preset(model).resolution if model in preset_names() else None


# -- derived numbers -------------------------------------------------------------------------------------
def derive(cfg: SuiteConfig, results: dict, rows: dict, outputs: dict, flops: NetworkFlops | None,
           scaling_flops: dict, reference_name: str, compare) -> None:
    """Ratios, FLOP/s, utilization and parity from the workers' raw results, into ``results``.

    Time basis of achieved FLOP/s and utilization: on the CPU with one thread per process, CPU time (for
    the runs and for the peak alike), since a process descheduled on a shared machine does no work in the
    meantime; otherwise wall-clock time. Ratios are given on both bases."""
    import torch

    cpu_basis = torch.device(cfg.device).type == "cpu" and cfg.threads == 1
    results["time_basis"] = "cpu" if cpu_basis else "wall"
    eager = rows.get("eager", {})
    peak_info = eager.get("peak") if eager.get("ok") else None
    peak = None
    if peak_info:
        peak = peak_info.get("best_cpu_flops") if cpu_basis else peak_info.get("best_flops")
    results["peak"] = peak_info
    results["peak_flops"] = peak

    def basis(stats: dict | None) -> float | None:
        if not stats:
            return None
        if cpu_basis and stats.get("cpu_s") is not None:
            return stats["cpu_s"]["median_s"]
        if cpu_basis and stats.get("cpu") is not None:
            return stats["cpu"]["median_s"]
        return (stats.get("total_s") or stats)["median_s"]

    def ratio(a, b):
        return (a / b) if a and b else None

    image_flops = flops.image(cfg.steps, cfg.fusion_steps, "minimal", True, cfg.batch) if flops else None
    ref = outputs.get(reference_name)
    eager_cpu = eager.get("phases", {}).get("cpu_s", {}).get("median_s") if eager.get("ok") else None
    e2e = []
    for name, r in rows.items():
        row = {k: v for k, v in r.items() if k not in ("stages", "comparisons", "scaling", "peak", "job")}
        if r.get("ok"):
            med = r["median_s"]
            cpu = r["phases"].get("cpu_s", {}).get("median_s")
            row["cpu_median_s"] = cpu
            row["speedup_vs_eager"] = ratio(eager.get("median_s") if eager.get("ok") else None, med)
            row["speedup_vs_eager_cpu"] = ratio(eager_cpu, cpu)
            row["loop_s_per_step"] = r["phases"]["loop_s"]["median_s"] / cfg.steps
            row["flops_per_request"] = image_flops
            row.update(achieved(image_flops, basis(r["phases"]), peak))
            if ref is not None and name != reference_name and ref[0].size and outputs[name][0].size:
                lat, img = outputs[name]
                p = compare(torch.from_numpy(lat), torch.from_numpy(ref[0]), img, ref[1])
                row["parity"] = {**p.__dict__, "reference": reference_name}
        e2e.append(row)
    results["e2e"] = e2e

    # Stages: torch (eager process) and onnxruntime rows side by side.
    stages: dict[str, dict[str, Any]] = {}
    for backend_name in ("eager", "onnxruntime"):
        for s in (rows.get(backend_name, {}).get("stages") or []):
            entry = stages.setdefault(s["graph"], {"stage": s["stage"], "graph": s["graph"], "batch": s["batch"],
                                                   "what": s["what"]})
            if flops:
                entry["flops"] = flops.graph(s["graph"], s["batch"])
            key = "torch" if backend_name == "eager" else "onnxruntime"
            m = {k: v for k, v in s.items() if k not in ("stage", "graph", "batch", "what", "backend")}
            if m.get("status") == "ok":
                m.update(achieved(entry.get("flops"), basis(m), peak))
            entry[key] = m
    for entry in stages.values():
        t, o = entry.get("torch") or {}, entry.get("onnxruntime") or {}
        if t.get("status") == "ok" and o.get("status") == "ok":
            entry["ort_speedup"] = ratio(t["median_s"], o["median_s"])
            entry["ort_speedup_cpu"] = ratio(t["cpu"]["median_s"], o["cpu"]["median_s"])
    results["stages"] = list(stages.values())

    # Comparisons.
    comps = []
    for c in rows.get("eager", {}).get("comparisons") or []:
        f = (flops.image(c["steps"], c["fusion_steps"], c["mode"], c["reference_guidance"], cfg.batch,
                         decode=c.get("decode", True)) if flops else None)
        comps.append({**c, "unet_evals_per_step": unet_evals_per_step(c["mode"], c["fusion_steps"],
                                                                      c["reference_guidance"]),
                      "flops_per_request": f, **achieved(f, basis(c), peak)})

    def med(c, key):
        return (c.get(key) or {}).get("median_s")

    plain = next((c for c in comps if c["mode"] == "plain"), None)
    for c in comps:
        if c["group"] == "eager" and plain:
            c["ratio_vs_plain"] = ratio(med(c, "total_s"), med(plain, "total_s"))
            c["ratio_vs_plain_cpu"] = ratio(med(c, "cpu_s"), med(plain, "cpu_s"))
        if c["group"] == "fused":
            mini = next((m for m in comps if m["group"] == "fused" and m["mode"] == "minimal"
                         and m["fusion_steps"] == c["fusion_steps"]), None)
            if mini:
                c["ratio_vs_minimal"] = ratio(med(c, "total_s"), med(mini, "total_s"))
                c["ratio_vs_minimal_cpu"] = ratio(med(c, "cpu_s"), med(mini, "cpu_s"))
    results["comparisons"] = comps

    # Scaling.
    scal = []
    for name, r in rows.items():
        for p in (r.get("scaling") or []):
            p = {**p, "backend": name}
            if p.get("status") == "ok":
                nf = scaling_flops.get(p["resolution"]) if p["axis"] == "resolution" else flops
                f = nf.image(p["steps"], cfg.fusion_steps, "minimal", True, p["batch"]) if nf else None
                m = p["total_s"]["median_s"]
                p.update(flops_per_request=f, s_per_image=m / p["batch"], images_per_s=p["batch"] / m,
                         loop_s_per_step=p["loop_s"]["median_s"] / p["steps"], **achieved(f, basis(p), peak))
            scal.append(p)
    results["scaling"] = scal


def default_out(device: str = "cpu") -> Path:
    return ROOT / "benchmarks" / "results" / machine_tag(device)


__all__ = ["BACKEND_ORDER", "BACKEND_ROWS", "SuiteConfig", "default_out", "run_suite"]
