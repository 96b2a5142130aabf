"""Run ONE backend in this process and write its outputs and timings (``python -m profusion_rt.benchmarks.worker``).

Each backend is measured in its own process: torch's OpenMP pool and onnxruntime's thread pool disturb
each other when they share one. The job is a JSON object (``--job``); the worker writes
``<out>/<name>.npz`` (final latents and decoded images, float32) and ``<out>/<name>.json`` (timings of
every run, first-call time, peak memory, versions).

Job keys (all but ``backend`` and ``out`` optional):

* ``backend``: "eager" (the reference pipeline) or a runtime backend (torch, torch-compile, onnxruntime,
  tensorrt); ``name`` (default: the backend) names the output files;
* ``model`` (preset or folder, default tiny), ``device``, ``dtype``, ``weights_seed``, ``resolution``
  (a preset at another resolution, see :func:`profusion_rt.benchmarks.models.preset_at_resolution`);
* ``request``: keyword arguments of the pipeline call; ``"reference": "demo"`` (default) uses the demo
  photo, ``null`` runs without a reference (plain SD2);
* ``threads``: torch intra-op threads; ``ort_threads``: onnxruntime intra-op threads (when given, the
  onnxruntime engines are built here with that count); ``artifacts``, ``precision``;
  ``use_cuda_graph`` (default: the runtime's choice), ``compile_mode``;
* ``warmup`` (extra untimed calls after the first call, default 0), ``repeats`` (default 3);
* ``tasks``: what to measure, default ``["e2e"]`` (the demo's job). Also: ``"peak"`` (dense-matmul FLOP/s
  of this process), ``"stages"`` (per-graph micro-benchmarks: torch modules for eager/torch, the exported
  graphs for onnxruntime; options in ``stages``), ``"compare"`` (sampling modes at equal steps, options
  in ``compare``), ``"scaling"`` (batch size, step count, resolution; options in ``scaling``).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from profusion_rt.benchmarks.measure import (
    current_rss_mb,
    machine_info,
    peak_rss_mb,
    summarize,
    time_calls,
    versions,
)

PHASES = ("total_s", "prepare_s", "loop_s", "decode_s", "cpu_s")

logger = logging.getLogger(__name__)

EAGER = "eager"
from profusion_rt.benchmarks.costs import STAGES, TORCH_ONLY
from profusion_rt.benchmarks.measure import make_sync, peak_matmul_flops
from profusion_rt.benchmarks.models import build_pipeline
from profusion_rt.benchmarks.official import official_runtime, official_stage_modules

from profusion_rt.artifacts.specs import get_graph
from profusion_rt.artifacts.store import model_hash
from profusion_rt.core.dtypes import torch_dtype
from profusion_rt.core.errors import ModelLoadError, ProFusionError
from profusion_rt.core.samples import DEMO_PROMPT, demo_reference_image
from profusion_rt.models.tokenizer import replace_placeholder
from profusion_rt.pipeline import ProFusionPipeline
from profusion_rt.runtime import create_runtime
from profusion_rt.runtime.artifact_pipeline import create_runtime_from_artifacts
from profusion_rt.runtime.backends import select_artifact
from profusion_rt.runtime.ort_engine import OrtEngine


def _load_pipeline(job: dict[str, Any], resolution: int | None = None):
    import torch

    device = job.get("device", "cpu")
    resolution = resolution if resolution is not None else job.get("resolution")
    if torch.device(device).type == "cpu" and resolution is None:

        pipe = ProFusionPipeline.load(job.get("model", "tiny"), None, device, job.get("dtype", "fp32"),
                             job.get("weights_seed", 0))
    else:

        pipe = build_pipeline(job.get("model", "tiny"), device, job.get("dtype", "fp32"),
                              job.get("weights_seed", 0), resolution)
    pipe.progress_bar = False
    return pipe


def _request(job: dict[str, Any], **overrides) -> dict[str, Any]:
    request = dict(job["request"], **overrides)
    request["reference_image"] = demo_reference_image() if request.pop("reference", "demo") == "demo" else None
    return request


def create_backend_runtime(pipe, job: dict[str, Any]):
    """The runtime of ``job['backend']`` over ``pipe`` (``create_runtime``; ``ort_threads`` sets the
    onnxruntime engines' thread count). With ``artifacts_only`` the runtime is built from the artifact
    folder alone and ``pipe`` is not used."""

    backend = job["backend"]
    if job.get("artifacts_only"):
        # Every network from the exported graphs (Runtime.from_artifacts): the export-then-serve path.

        return create_runtime_from_artifacts(job["artifacts"], backend, device=pipe.device,
                                             precision=job.get("precision") or "fp32",
                                             threads=job.get("ort_threads") or job.get("threads"))
    options = {}
    if job.get("precision"):
        options["precision"] = job["precision"]
    if job.get("compile_mode"):
        options["compile_mode"] = job["compile_mode"]
    if backend == "onnxruntime" and job.get("ort_threads"):
        options["threads"] = int(job["ort_threads"])
    return create_runtime(pipe, backend, artifacts=job.get("artifacts"), use_cuda_graph=job.get("use_cuda_graph"),
                          **options)


def make_generate(pipe, job: dict[str, Any], sync: Callable[[], None], decode: bool = True,
                  ) -> Callable[[dict], tuple]:
    """``generate(request) -> (latents, images, timing)`` for the job's backend over ``pipe``; timing holds
    the wall-clock phases and ``cpu_s`` (this process's CPU time). ``decode=False`` skips the VAE decode
    (images None, decode_s 0)."""
    if job["backend"] == EAGER:
        def generate(request):
            c = time.process_time()
            t = time.perf_counter()
            req = pipe.prepare(**request)
            sync()
            t1 = time.perf_counter()
            x = pipe.denoise(req)
            sync()
            t2 = time.perf_counter()
            images = pipe.decode(x, "np") if decode else None
            sync()
            t3 = time.perf_counter()
            return x, images, {"prepare_s": t1 - t, "loop_s": t2 - t1, "decode_s": t3 - t2, "total_s": t3 - t,
                               "cpu_s": time.process_time() - c}
        return generate

    runtime = create_backend_runtime(pipe, job)
    return _runtime_generate(runtime, sync, decode)


def _runtime_generate(runtime, sync, decode: bool = True):
    def generate(request):
        c = time.process_time()
        t = time.perf_counter()
        out = runtime(output_type="np" if decode else "latent", **request)
        sync()
        timings = runtime.last_timings
        return out.latents, (out.images if decode else None), {
            "prepare_s": timings.prepare_s, "loop_s": timings.loop_s, "decode_s": timings.decode_s,
            "total_s": time.perf_counter() - t, "cpu_s": time.process_time() - c}
    return generate


def _run_series(generate, request, warmup: int, repeats: int) -> dict[str, Any]:
    """First call, ``warmup`` untimed calls, ``repeats`` timed calls of one request."""
    t = time.perf_counter()
    latents, images, _ = generate(request)
    first_call_s = time.perf_counter() - t
    for _ in range(int(warmup)):
        generate(request)
    runs = []
    for _ in range(max(int(repeats), 1)):
        latents, images, timing = generate(request)
        runs.append(timing)
    return {"first_call_s": first_call_s, "runs": runs, "latents": latents, "images": images}


def _phase_summaries(runs: list[dict[str, float]]) -> dict[str, Any]:
    return {key: summarize([r[key] for r in runs]) for key in PHASES if all(key in r for r in runs)}


# -- tasks ---------------------------------------------------------------------------------------------
def task_stages(pipe, job: dict[str, Any], sync) -> list[dict[str, Any]]:
    """Per-graph micro-benchmarks: torch modules (eager/torch backends) or exported graphs (onnxruntime).
    Every graph is warmed up first; the timed calls then go round the graphs repeat by repeat, so drift
    on a shared machine hits every stage alike."""
    import torch

    opts = dict(job.get("stages") or {})
    warmup, repeats = int(opts.get("warmup", 2)), max(int(opts.get("repeats", 7)), 1)
    images = int(opts.get("batch", 1))
    graphs = opts.get("graphs")
    backend = job["backend"]
    prompt = job["request"].get("prompt", DEMO_PROMPT)
    rows, calls = [], {}
    for stage, graph, mult, what in STAGES:
        if graphs is not None and graph not in graphs:
            continue
        batch = mult * images
        row = {"stage": stage, "graph": graph, "batch": batch, "what": what, "backend": backend}
        rows.append(row)
        if backend == "onnxruntime" and graph in TORCH_ONLY:
            row.update(status="skipped", reason="torch-only variant (measure only, not exported)")
            continue
        try:
            call = _ort_stage_call(pipe, job, graph, batch) if backend == "onnxruntime" else \
                _torch_stage_call(pipe, graph, batch, prompt)
            if call is None:
                row.update(status="skipped", reason="not exported in this run")
                continue
            with torch.no_grad():
                row["first_s"] = time_calls(call, warmup=warmup, repeats=1, sync=sync)["first_s"]
            calls[graph] = call
        except Exception as exc:  # one failing stage must not hide the others
            logger.warning("stage %s on %s failed: %s", graph, backend, exc)
            row.update(status="failed", reason=f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
    wall: dict[str, list[float]] = {g: [] for g in calls}
    cpu: dict[str, list[float]] = {g: [] for g in calls}
    with torch.no_grad():
        for _ in range(repeats):
            for graph, call in calls.items():
                c = time.process_time()
                t = time.perf_counter()
                call()
                sync()
                wall[graph].append(time.perf_counter() - t)
                cpu[graph].append(time.process_time() - c)
    for row in rows:
        if row["graph"] in calls:
            row.update(status="ok", **summarize(wall[row["graph"]]), cpu=summarize(cpu[row["graph"]]))
    return rows


def _torch_stage_call(pipe, graph: str, batch: int, prompt: str):
    if graph in ("fusion_stage_official", "refinement_stage_official"):

        fusion, refinement = official_stage_modules(pipe, prompt)
        module = fusion if graph.startswith("fusion") else refinement
        spec = get_graph(graph.removesuffix("_official"))
    else:
        spec = get_graph(graph)
        module = spec.build_module(pipe)
    feeds = spec.sample_inputs(pipe, batch=batch, seed=0)
    args = [feeds[n] for n in spec.input_names]
    return lambda: module(*args)


def _ort_stage_call(pipe, job: dict[str, Any], graph: str, batch: int):
    import torch

    precision = job.get("precision") or "fp32"
    try:
        entry = select_artifact(Path(job["artifacts"]), model_hash(pipe), graph, precision)
    except ModelLoadError:
        return None
    spec = get_graph(graph)
    lo, hi = entry.dynamic_batch or (entry.batch, entry.batch)
    if not lo <= batch <= hi:
        raise ValueError(f"artifact batch range {lo}..{hi} excludes batch {batch}")
    engine = OrtEngine(entry.ort_onnx_path or entry.opt_onnx_path or entry.onnx_path, device=pipe.device,
                       threads=job.get("ort_threads") or job.get("threads"), batch_range=(lo, hi))
    feeds = spec.sample_inputs(pipe, batch=batch, seed=0)
    shapes = spec.resolve_shapes(pipe, batch)
    _, outs = spec.tensors(precision)
    outputs = {t.name: torch.empty(shapes[t.name], dtype=torch_dtype(t.dtype), device=pipe.device) for t in outs}
    return lambda: engine.run(feeds, outputs)


def task_compare(pipe, job: dict[str, Any], sync) -> list[dict[str, Any]]:
    """Sampling modes at equal steps, interleaved repeat by repeat (drift on a shared machine hits every
    mode alike). Group "eager": the reference pipeline, plain SD2 CFG vs ProFusion with fusion_steps 0, 1,
    2. Group "fused": the torch runtime loop with our minimal stages vs the official-style stages."""

    opts = dict(job.get("compare") or {})
    steps = int(opts.get("steps", job["request"].get("num_inference_steps", 10)))
    warmup, repeats = int(opts.get("warmup", 1)), int(opts.get("repeats", 3))
    fusion_list = [int(r) for r in opts.get("fusion_steps", [0, 1, 2])]
    official_list = [int(r) for r in opts.get("official_fusion_steps", [1])]
    prompt = job["request"].get("prompt", DEMO_PROMPT)
    class_word = job["request"].get("class_word", "person")
    base = _request(job, num_inference_steps=steps)
    base.pop("fusion_steps", None)
    plain = dict(base, reference_image=None, prompt=replace_placeholder(prompt, class_word))
    decode = bool(opts.get("decode", False))  # the VAE decode is the same for every mode
    eager = make_generate(pipe, dict(job, backend=EAGER), sync, decode)
    fused = _runtime_generate(create_runtime(pipe, "torch", use_cuda_graph=job.get("use_cuda_graph")), sync, decode)
    official = _runtime_generate(official_runtime(pipe, prompt, class_word, use_cuda_graph=job.get("use_cuda_graph")),
                                 sync, decode)

    modes: list[tuple[dict, Callable, dict]] = [
        ({"group": "eager", "mode": "plain", "label": "plain SD2 guidance (no reference)", "fusion_steps": 0,
          "reference_guidance": False}, eager, plain),
        ({"group": "eager", "mode": "minimal", "label": "ProFusion without fusion (R=0, no C~)", "fusion_steps": 0,
          "reference_guidance": False}, eager, dict(base, fusion_steps=0, reference_guidance_scale=0.0)),
    ]
    for r in fusion_list:
        modes.append(({"group": "eager", "mode": "minimal", "label": f"fusion sampling, R={r}", "fusion_steps": r,
                       "reference_guidance": True}, eager, dict(base, fusion_steps=r)))
    for r in official_list:
        modes.append(({"group": "fused", "mode": "minimal", "label": f"fused stages, minimal (ours), R={r}",
                       "fusion_steps": r, "reference_guidance": True}, fused, dict(base, fusion_steps=r)))
        modes.append(({"group": "fused", "mode": "official", "label": f"fused stages, official-style, R={r}",
                       "fusion_steps": r, "reference_guidance": True}, official, dict(base, fusion_steps=r)))
    runs: list[list[dict]] = [[] for _ in modes]
    outputs: list[Any] = [None] * len(modes)
    for _ in range(1 + warmup):
        for i, (_, gen, req) in enumerate(modes):
            outputs[i] = gen(req)[0]
    for _ in range(max(repeats, 1)):
        for i, (_, gen, req) in enumerate(modes):
            runs[i].append(gen(req)[2])
    rows = []
    for i, (meta, _, req) in enumerate(modes):
        rows.append({**meta, "steps": steps, "decode": decode, "runs": runs[i], **_phase_summaries(runs[i])})
    # The official-style stages must give the minimal ones' result: record the difference.
    for i, (meta, _, _) in enumerate(modes):
        if meta["mode"] == "official":
            ref = next(j for j, (m, _, _) in enumerate(modes) if m["group"] == "fused" and m["mode"] == "minimal"
                       and m["fusion_steps"] == meta["fusion_steps"])
            diff = (outputs[i].float() - outputs[ref].float()).abs().max().item()
            rows[i]["max_abs_diff_vs_minimal"] = diff
    return rows


def task_scaling(job: dict[str, Any], pipe, generate, sync) -> list[dict[str, Any]]:
    """Batch size, step count and resolution sweeps of this backend (one request shape per point)."""
    import torch

    opts = dict(job.get("scaling") or {})
    warmup, repeats = int(opts.get("warmup", 1)), int(opts.get("repeats", 2))
    base_steps = int(opts.get("base_steps", job["request"].get("num_inference_steps", 10)))
    device = torch.device(job.get("device", "cpu"))
    points: list[tuple[str, int, dict, int | None]] = []
    for b in opts.get("batch", []):
        points.append(("batch", int(b), {"num_inference_steps": base_steps, "num_images_per_prompt": int(b)}, None))
    for s in opts.get("steps", []):
        points.append(("steps", int(s), {"num_inference_steps": int(s)}, None))
    for res in opts.get("resolution", []):
        points.append(("resolution", int(res), {"num_inference_steps": base_steps}, int(res)))
    rows = []
    pipes: dict[int | None, tuple] = {None: (pipe, generate)}
    done: dict[tuple, dict] = {}  # one measurement per distinct (batch, steps, resolution)
    for axis, value, overrides, res in points:
        row = {"axis": axis, "value": value, "batch": overrides.get("num_images_per_prompt", 1),
               "steps": overrides["num_inference_steps"], "resolution": res or pipe.resolution}
        key = (row["batch"], row["steps"], row["resolution"])
        if key in done:
            rows.append({**done[key], "axis": axis, "value": value})
            continue
        try:
            if res is not None and res == pipe.resolution:
                res = None
            if res not in pipes:
                pipes.clear()  # free the previous resolution's models first
                pipes[None] = (pipe, generate)
                p = _load_pipeline(job, resolution=res)
                pipes[res] = (p, make_generate(p, job, sync))
            _, gen = pipes[res]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            series = _run_series(gen, _request(job, **overrides), warmup, repeats)
            row.update(status="ok", first_call_s=series["first_call_s"], runs=series["runs"],
                       **_phase_summaries(series["runs"]),
                       peak_rss_mb=peak_rss_mb(), rss_mb=current_rss_mb(),
                       peak_cuda_mb=(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None)
        except Exception as exc:
            logger.warning("scaling point %s=%s failed: %s", axis, value, exc)
            row.update(status="failed", reason=f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
        done[key] = row
        rows.append(row)
    return rows


# -- the job -------------------------------------------------------------------------------------------
class Session:
    """One backend loaded in this process. :func:`run_job` drives it straight through; ``--serve`` lets the
    suite drive it call by call, so that timed runs of several backends (each in its own process, only
    one active at a time) can be interleaved round by round and share the machine's drift."""

    def __init__(self, job: dict[str, Any]):
        import torch

        if job.get("threads"):
            torch.set_num_threads(int(job["threads"]))
        self.job = job
        self.backend = job["backend"]
        self.device = job.get("device", "cpu")
        self.tasks = list(job.get("tasks") or ["e2e"])
        self.sync = make_sync(self.device)
        self.name = job.get("name", self.backend)
        t0 = time.perf_counter()
        self.pipe = _load_pipeline(job)
        load_s = time.perf_counter() - t0
        if torch.device(self.device).type == "cuda":
            # CUDA: weights are initialised in float32 and then cast; the peak reported is the run's
            torch.cuda.reset_peak_memory_stats(self.device)
        self.result: dict[str, Any] = {"name": self.name, "backend": self.backend, "tasks": self.tasks,
                                       "load_s": load_s}
        t = time.perf_counter()
        self.generate = make_generate(self.pipe, job, self.sync) if {"e2e", "scaling"} & set(self.tasks) else None
        self.result["setup_s"] = time.perf_counter() - t
        self.request = _request(job)
        self.runs: list[dict[str, float]] = []
        self.latents = self.images = None

    def call(self, kind: str = "timed") -> dict[str, float]:
        """One end-to-end request: ``kind`` "first" (untimed, reported as first_call_s), "warmup" or "timed"."""
        t = time.perf_counter()
        latents, images, timing = self.generate(self.request)
        elapsed = time.perf_counter() - t
        self.latents, self.images = latents, images
        if kind == "first":
            self.result["first_call_s"] = elapsed
        elif kind == "timed":
            self.runs.append(timing)
        return timing

    def task(self, name: str) -> Any:
        if name == "peak":
            import torch

            # CPUs have no fast half-precision GEMM (an fp16 2048^2 matmul takes minutes): fp32 there
            dtype = self.job.get("dtype", "fp32") if torch.device(self.device).type == "cuda" else "fp32"
            peak = peak_matmul_flops(self.device, dtype)
            old = self.result.get("peak")
            # measured more than once on a shared machine: the least disturbed measurement is the peak
            if old is not None:
                peak["earlier"] = {k: v for k, v in old.items() if k != "earlier"}
                if old["best_flops"] > peak["best_flops"]:
                    peak = dict(old, earlier=peak)
            self.result["peak"] = peak
        elif name == "stages":
            self.result["stages"] = task_stages(self.pipe, self.job, self.sync)
        elif name == "compare":
            self.result["comparisons"] = task_compare(self.pipe, self.job, self.sync)
        elif name == "scaling":
            self.result["scaling"] = task_scaling(self.job, self.pipe, self.generate, self.sync)
        else:
            raise ValueError(f"unknown task {name!r}")
        return self.result["comparisons" if name == "compare" else name]

    def finish(self) -> dict[str, Any]:
        """Write ``<name>.npz`` and ``<name>.json`` and return the result."""
        import numpy as np
        import torch

        out = Path(self.job["out"])
        out.mkdir(parents=True, exist_ok=True)
        latents = images = np.zeros((0,), dtype=np.float32)
        if self.runs:
            totals = [r["total_s"] for r in self.runs]
            latents = self.latents.float().cpu().numpy()
            images = np.asarray(self.images, dtype=np.float32)
            self.result.update(runs=self.runs, median_s=statistics.median(totals), min_s=min(totals),
                               max_s=max(totals), phases=_phase_summaries(self.runs))
        np.savez(out / f"{self.name}.npz", latents=latents, images=images)
        self.result.update({
            "peak_rss_mb": peak_rss_mb(),
            "peak_cuda_mb": (torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None,
            "threads": torch.get_num_threads(),
            "machine": machine_info(self.device) | {"processor": platform.processor()},
            "versions": versions(),
            "job": {k: v for k, v in self.job.items() if k != "out"},
        })
        (out / f"{self.name}.json").write_text(json.dumps(self.result, indent=2, default=str))
        return self.result


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run the job's tasks straight through (the demo's path): the first call, ``warmup`` more untimed
    calls, ``repeats`` timed calls, then the other tasks."""
    session = Session(job)
    if "peak" in session.tasks:
        session.task("peak")
    if "e2e" in session.tasks:
        session.call("first")
        for _ in range(int(job.get("warmup", 0))):
            session.call("warmup")
        for _ in range(max(int(job.get("repeats", 3)), 1)):
            session.call("timed")
    for name in ("stages", "compare", "scaling"):
        if name in session.tasks:
            session.task(name)
    return session.finish()


PROTOCOL_PREFIX = "@@bench "


def serve(job: dict[str, Any]) -> int:
    """``--serve``: load the backend, answer one JSON command per stdin line on the ORIGINAL stdout, each
    reply a line starting with :data:`PROTOCOL_PREFIX` (everything else printed goes to stderr).

    Commands: ``{"cmd": "call", "kind": "first" | "warmup" | "timed"}``, ``{"cmd": "task", "task": name}``,
    ``{"cmd": "finish"}`` (writes the files, replies, exits). Replies: ``{"ok": true, ...}`` or
    ``{"ok": false, "error": "..."}``."""
    import os

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # library output (C and Python) must not corrupt the protocol
    sys.stdout = sys.stderr

    def send(message: dict[str, Any]) -> None:
        proto.write(PROTOCOL_PREFIX + json.dumps(message, default=str) + "\n")
        proto.flush()

    try:
        session = Session(job)
    except Exception as exc:
        send({"ok": False, "event": "ready", "error": _error_text(exc)})
        return 1
    send({"ok": True, "event": "ready", "load_s": session.result["load_s"], "setup_s": session.result["setup_s"]})
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "call":
                reply = {"ok": True, "timing": session.call(cmd.get("kind", "timed"))}
            elif cmd["cmd"] == "task":
                session.task(cmd["task"])
                reply = {"ok": True}
            elif cmd["cmd"] == "finish":
                result = session.finish()
                send({"ok": True, "median_s": result.get("median_s")})
                return 0
            else:
                reply = {"ok": False, "error": f"unknown command {cmd['cmd']!r}"}
        except Exception as exc:
            logger.exception("command %s failed", cmd)
            reply = {"ok": False, "error": _error_text(exc)}
        send(reply)
    return 0


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, help="the job as a JSON object")
    parser.add_argument("--serve", action="store_true", help="answer commands on stdin (used by the suite)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    if args.serve:
        return serve(json.loads(args.job))
    try:
        run_job(json.loads(args.job))
    except ProFusionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
