"""``profusion-rt doctor``: the ladder of checks that tests a new machine (a GPU when one is there) end to end.

Each check compares a path with the eager reference pipeline on the same seeds, and the ladder stops at the
first that fails, saying why: ``tiny-fp32`` (eager vs fused runtime vs CUDA-graph replay), ``torch-compile``
(no recompilation), ``sd2-base-fp16`` (GPU only), ``onnxruntime``, ``tensorrt``, ``customize``. ``--budget-s``
keeps the run inside a time limit (a check that would not fit is reported as skipped, never dropped). The
environment summary and the timing table are in :mod:`.doctor_report`, the command line in
:mod:`.doctor_cli`. What each check does, the budget rules and the exit status: docs/doctor.md.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from profusion_rt.benchmarks.doctor_report import (
    INSTALL_LINES,
    environment,
    environment_lines,
    summary,
)
from profusion_rt.benchmarks.measure import make_sync, summarize
from profusion_rt.benchmarks.models import build_pipeline
from profusion_rt.benchmarks.worker import _runtime_generate, make_generate
from profusion_rt.export.cache import export_artifacts

from profusion_rt.core.finite import check_finite
from profusion_rt.core.samples import DEMO_PROMPT, demo_reference_image
from profusion_rt.pipeline import ProFusionPipeline
from profusion_rt.runtime import create_runtime
from profusion_rt.runtime.backends import STAGE_GRAPHS
from profusion_rt.runtime.parity import compare
from profusion_rt.training.jobs import customize
from profusion_rt.training.trainer import TrainConfig, trainable_parameters

logger = logging.getLogger(__name__)

CHECKS = ("tiny-fp32", "torch-compile", "sd2-base-fp16", "onnxruntime", "tensorrt", "customize")
SKIPPABLE = CHECKS + ("timing",)
#: (seed, steps) of the tiny ladder's requests, in the order every backend runs them: the second request
#: replays the first one's shape with new inputs, the third changes the shape
REQUESTS = ((0, 2), (1, 2), (0, 3), (1, 3))
SD2_STEPS = 10
#: fp16 and TensorRT results are compared with a PSNR floor instead of element-wise parity
PSNR_FLOOR_DB = 25.0
#: a quiet 2-core CPU's eager tiny call at 2 steps (prepare + loop + decode, the demo photo): the unit of
#: the machine-speed factor that scales the estimates below
NOMINAL_CPU_CALL_S = 0.8
#: estimated seconds per check on a quiet machine (CPU: 2 cores; CUDA: a data-centre GPU)
ESTIMATES = {
    "cpu": {"tiny-fp32": 20, "torch-compile": 110, "onnxruntime": 35, "customize": 8},
    "cuda": {"tiny-fp32": 30, "torch-compile": 150, "sd2-base-fp16": 120, "onnxruntime": 60, "tensorrt": 300,
             "customize": 30},
}
DEFAULT_BUDGET_S = {"cpu": 240.0, "cuda": 540.0}
#: seconds of the budget kept for writing the reports
REPORT_RESERVE_S = 2.0


class CheckFailed(Exception):
    """A check's finding: the ladder stops here (the message says why)."""


class BudgetExceeded(BaseException):
    """Raised by the alarm when a check runs past the end of ``--budget-s`` (a BaseException, so that no
    ``except Exception`` inside the checked code swallows it)."""


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise :class:`BudgetExceeded` in this (main) thread after ``seconds``; a no-op off the main thread or
    where SIGALRM does not exist (there the estimates alone keep the budget)."""
    usable = (seconds is not None and hasattr(signal, "SIGALRM")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise BudgetExceeded(f"stopped after {seconds:.0f} s, when the budget ran out")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(float(seconds), 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class CheckResult:
    name: str
    title: str
    status: str = "not run"  # passed | failed | skipped | not run
    reason: str = ""
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Timed:
    """A generate function kept by a passing check for the timing table."""

    config: str  # "tiny fp32", "sd2-base fp16"
    backend: str
    generate: Callable[[dict], tuple]
    request: dict
    call_s: float  # one call's wall time seen in the check (for the budget)


def _sync_fn(device):
    return make_sync(device)


def busy_cpu() -> tuple[float, int] | None:
    """(1-minute load average, cores) when the load is at least the core count, else None."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    return (load, cores) if load >= cores else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400]


# -- the ladder -------------------------------------------------------------------------------------------------
class Doctor:
    def __init__(self, device: str, budget_s: float, out: Path, skip=(), artifacts: Path | None = None,
                 timing_steps: int = 10, timing_repeats: int = 2, log: Callable[[str], None] = print):
        import torch

        self.device = torch.device(device)
        self.kind = "cuda" if self.device.type == "cuda" else "cpu"
        self.budget_s = float(budget_s)
        self.out = Path(out)
        self.skip = set(skip)
        self.artifacts = None if artifacts is None else Path(artifacts)
        self.timing_steps = int(timing_steps)
        self.timing_repeats = int(timing_repeats)
        self.log = log
        self.start = time.perf_counter()
        self.slowness = 1.0
        self.timed: list[Timed] = []
        self._pipe = None
        self._cpu_pipe = None
        self._image = None
        self._refs: dict[tuple[int, int], tuple[Any, Any, float]] = {}
        self._tmp: tempfile.TemporaryDirectory | None = None

    # -- shared state ----------------------------------------------------------------------------------------
    def remaining(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    @property
    def sync(self):
        return _sync_fn(self.device)

    @property
    def image(self):
        if self._image is None:

            self._image = demo_reference_image()
        return self._image

    @property
    def cpu_pipe(self):
        """The tiny preset (seed 0) built on the CPU: the weights every tiny check uses (and exports)."""
        if self._cpu_pipe is None:

            self._cpu_pipe = ProFusionPipeline.from_preset("tiny", seed=0)
            self._cpu_pipe.progress_bar = False
        return self._cpu_pipe

    @property
    def pipe(self):
        """The tiny pipeline on the device (the same weights as :attr:`cpu_pipe`)."""
        if self._pipe is None:
            self._pipe = self.cpu_pipe if self.kind == "cpu" else copy.deepcopy(self.cpu_pipe).to(self.device)
            self._pipe.progress_bar = False
        return self._pipe

    def request(self, seed: int, steps: int) -> dict:
        return dict(reference_image=self.image, prompt=DEMO_PROMPT, num_inference_steps=steps, seed=seed,
                    fusion_steps=1)

    def reference(self, seed: int, steps: int):
        """(latents, images, seconds) of the eager tiny fp32 pipeline, computed once per (seed, steps)."""
        key = (seed, steps)
        if key not in self._refs:
            t = time.perf_counter()
            out = self.pipe(output_type="np", **self.request(seed, steps))
            self.sync()
            self._refs[key] = (out.latents.float().cpu(), out.images, time.perf_counter() - t)
            if len(self._refs) == 2 and self.kind == "cpu":
                # the second call (warm) against a quiet machine's: how much slower this machine is now
                self.slowness = max(1.0, self._refs[key][2] / NOMINAL_CPU_CALL_S)
        return self._refs[key]

    def artifact_root(self, name: str) -> Path:
        if self.artifacts is not None:
            return self.artifacts / name
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="profusion-doctor-")
        return Path(self._tmp.name) / name

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def compare_runtime(self, label: str, runtime, requests=REQUESTS, psnr_floor: float | None = None
                        ) -> dict[str, Any]:
        """Run ``runtime`` on ``requests`` in order; each against the eager reference of the same seed and
        steps: element-wise parity (or, with ``psnr_floor``, finite and at least that PSNR)."""

        worst: dict[str, Any] = {}
        last = 0.0
        for seed, steps in requests:
            ref_latents, ref_images, _ = self.reference(seed, steps)
            t = time.perf_counter()
            out = runtime(output_type="np", **self.request(seed, steps))
            self.sync()
            last = time.perf_counter() - t
            p = compare(out.latents.float().cpu(), ref_latents, out.images, ref_images)
            where = f"seed {seed}, {steps} steps"
            if psnr_floor is None and not p.ok():
                raise CheckFailed(
                    f"{label} differs from eager at {where}: latent max rel. err {p.latent_max_rel:.2e} "
                    f"(tolerance 1e-4), pixels within 1/255 {100 * p.pixel_match:.2f}% (need 99%)")
            if psnr_floor is not None and not p.psnr_db >= psnr_floor:
                raise CheckFailed(f"{label} is far from eager at {where}: PSNR {p.psnr_db:.1f} dB "
                                  f"(floor {psnr_floor:.0f} dB), latent max rel. err {p.latent_max_rel:.2e}")
            if not worst or p.latent_max_rel > worst["latent_max_rel"]:
                worst = {"latent_max_rel": p.latent_max_rel, "pixel_match": p.pixel_match,
                         "psnr_db": None if math.isinf(p.psnr_db) else p.psnr_db, "at": where}
        worst["call_s"] = last
        return worst

    def keep_for_timing(self, config: str, backend: str, generate, call_s: float) -> None:
        steps = self.timing_steps if config.startswith("tiny") else SD2_STEPS
        request = self.request(0, steps)
        # the check's calls ran at 2-3 steps: scale its call time to the timing request's step count
        self.timed.append(Timed(config, backend, generate, request, call_s * max(1.0, steps / 3)))

    # -- the checks ----------------------------------------------------------------------------------------
    def check_tiny_fp32(self) -> dict[str, Any]:


        # the first two references (the others are computed when a backend reaches them)
        a, b = (self.reference(*key) for key in REQUESTS[:2])
        if compare(a[0], b[0], a[1], b[1]).latent_max_rel < 1e-3:
            raise CheckFailed("the eager pipeline gave the same latents for two seeds: the seed is ignored")
        details: dict[str, Any] = {"requests": [f"seed {s}, {n} steps" for s, n in REQUESTS],
                                   "eager_call_s": self._refs[REQUESTS[1]][2]}
        self.keep_for_timing("tiny fp32", "eager", make_generate(self.pipe, {"backend": "eager"}, self.sync),
                             self._refs[REQUESTS[1]][2])
        variants = [("torch (fused stages)", "torch", False)]
        if self.kind == "cuda":
            variants.append(("cuda-graph", "cuda-graph", True))
        else:
            details["cuda-graph"] = "skipped: needs CUDA"
        for label, key, graph in variants:
            runtime = create_runtime(self.pipe, "torch", use_cuda_graph=graph)
            details[key] = self.compare_runtime(label, runtime)
            self.keep_for_timing("tiny fp32", key, _runtime_generate(runtime, self.sync), details[key]["call_s"])
        return details

    def check_torch_compile(self) -> dict[str, Any]:
        import torch._dynamo
        from torch._dynamo.utils import counters

        label = "torch-compile+cuda-graph" if self.kind == "cuda" else "torch-compile"
        runtime = create_runtime(self.pipe, "torch-compile")
        frames0 = counters["frames"]["total"]
        breaks0 = sum(counters["graph_break"].values())
        graphs0 = counters["stats"]["unique_graphs"]
        t = time.perf_counter()
        try:
            first = self.compare_runtime(label, runtime, REQUESTS[:1])
            compile_s = time.perf_counter() - t
            frames1 = counters["frames"]["total"]
            rest = self.compare_runtime(label, runtime, REQUESTS[1:])
        except BudgetExceeded:
            torch._dynamo.reset()
            raise
        recompiles = counters["frames"]["total"] - frames1
        details = {"first_request_s": compile_s, "frames_compiled": frames1 - frames0,
                   "graphs": counters["stats"]["unique_graphs"] - graphs0,
                   "graph_breaks": sum(counters["graph_break"].values()) - breaks0,
                   "recompiles_after_first_request": recompiles, **(rest if rest["latent_max_rel"] >=
                                                                   first["latent_max_rel"] else first)}
        details["call_s"] = rest["call_s"]
        if recompiles:
            raise CheckFailed(f"torch.compile recompiled {recompiles} frame(s) after the first request (a new seed "
                              "or step count must reuse the compiled stages)")
        self.keep_for_timing("tiny fp32", label, _runtime_generate(runtime, self.sync), rest["call_s"])
        return details

    def check_sd2_fp16(self) -> dict[str, Any]:
        import torch

        pipe = build_pipeline("sd2-base", str(self.device), "fp16", seed=0)
        request = self.request(0, SD2_STEPS)
        t = time.perf_counter()
        ref = pipe(output_type="np", **request)
        self.sync()
        eager_s = time.perf_counter() - t
        check_finite(ref.latents, "latents after the loop", torch.float16, " (eager sd2-base)")
        runtime = create_runtime(pipe, "torch")  # CUDA graph on CUDA
        runtime(output_type="latent", **request)  # capture
        t = time.perf_counter()
        out = runtime(output_type="np", **request)
        self.sync()
        graph_s = time.perf_counter() - t
        p = compare(out.latents.float().cpu(), ref.latents.float().cpu(), out.images, ref.images)
        if not p.psnr_db >= PSNR_FLOOR_DB:
            raise CheckFailed(f"sd2-base fp16: the CUDA-graph runtime is far from eager fp16: PSNR {p.psnr_db:.1f} dB "
                              f"(floor {PSNR_FLOOR_DB:.0f} dB), latent max rel. err {p.latent_max_rel:.2e}")
        self.timed.append(Timed("sd2-base fp16", "eager", make_generate(pipe, {"backend": "eager"}, self.sync),
                                dict(request), eager_s))
        self.timed.append(Timed("sd2-base fp16", "cuda-graph", _runtime_generate(runtime, self.sync), dict(request),
                                graph_s))
        return {"steps": SD2_STEPS, "eager_s": eager_s, "cuda_graph_s": graph_s, "latents_finite": True,
                "image_finite": True, "psnr_db": None if math.isinf(p.psnr_db) else p.psnr_db,
                "latent_max_rel": p.latent_max_rel}

    def export_stages(self, name: str, **options) -> Path:
        root = self.artifact_root(name)
        reports = export_artifacts(self.cpu_pipe, root, graphs=list(STAGE_GRAPHS), batch=1, exporter="legacy",
                                   **options)
        for rep in reports:
            self.log(f"      {rep.summary()}")
        return root

    def check_onnxruntime(self) -> dict[str, Any]:
        import torch

        root = self.export_stages("onnx")
        runtime = create_runtime(self.pipe, "onnxruntime", artifacts=root, threads=torch.get_num_threads())
        sessions = [getattr(e, "session", None) for e in (runtime.fusion_engine, runtime.refinement_engine)]
        providers = sorted({p for s in sessions if s is not None for p in s.get_providers()})
        details = {"providers": providers, **self.compare_runtime("onnxruntime", runtime)}
        self.keep_for_timing("tiny fp32", "onnxruntime", _runtime_generate(runtime, self.sync), details["call_s"])
        return details

    def check_tensorrt(self) -> dict[str, Any]:
        root = self.export_stages("tensorrt", backend="tensorrt", precision="fp16")
        runtime = create_runtime(self.pipe, "tensorrt", artifacts=root, precision="fp16")
        io = {}
        for stage, engine in (("fusion_stage", runtime.fusion_engine), ("refinement_stage", runtime.refinement_engine)):
            trt_engine = getattr(engine, "engine", None)
            if trt_engine is None or not hasattr(trt_engine, "num_io_tensors"):
                continue
            names = [trt_engine.get_tensor_name(i) for i in range(trt_engine.num_io_tensors)]
            io[stage] = {n: f"{str(trt_engine.get_tensor_mode(n)).rsplit('.', 1)[-1].lower()} "
                            f"{str(trt_engine.get_tensor_dtype(n)).rsplit('.', 1)[-1]}" for n in names}
            self.log(f"      {stage} I/O: " + ", ".join(f"{n} {v}" for n, v in io[stage].items()))
        details = {"precision": "fp16", "io": io,
                   **self.compare_runtime("tensorrt fp16", runtime, psnr_floor=PSNR_FLOOR_DB)}
        self.keep_for_timing("tiny fp32", "tensorrt (fp16 plans)", _runtime_generate(runtime, self.sync),
                             details["call_s"])
        return details

    def check_customize(self) -> dict[str, Any]:
        import torch

        pipe = copy.deepcopy(self.cpu_pipe).to(self.device)
        before = {k: p.detach().clone() for k, p in trainable_parameters(pipe, "customize").items()}
        result = customize(pipe, self.image, None, steps=5, config=TrainConfig.customization(batch_size=2),
                           num_augmentations=3, progress=False)
        losses = [float(x) for x in result.train.losses]
        if len(losses) != 5 or not all(math.isfinite(x) for x in losses):
            raise CheckFailed(f"customization losses are not 5 finite numbers: {losses}")
        after = trainable_parameters(pipe, "customize")
        changed = sum(not torch.equal(before[k], after[k].detach()) for k in before)
        if not changed:
            raise CheckFailed("5 customization steps left every trainable weight unchanged")
        if not all(torch.isfinite(p).all() for p in after.values()):
            raise CheckFailed("customization produced non-finite weights")
        return {"steps": 5, "losses": losses, "tensors_updated": f"{changed} of {len(before)}"}

    # -- applicability -----------------------------------------------------------------------------------------
    def not_applicable(self, name: str) -> str | None:
        """Why check ``name`` cannot run on this machine, or None."""
        env = self.env
        if name == "sd2-base-fp16" and self.kind != "cuda":
            return "needs a CUDA GPU (SD2-base shapes in fp16); --device cpu runs the tiny ladder"
        if name == "onnxruntime":
            if not env["onnxruntime"]:
                return "onnxruntime is not installed (pip install -e '.[onnx]')"
            if not env["polygraphy"]:
                return "polygraphy is not installed (the export needs it: pip install -e '.[onnx]')"
            if self.kind == "cuda" and "CUDAExecutionProvider" not in env["onnxruntime_providers"]:
                return ("onnxruntime has no CUDA provider (pip uninstall -y onnxruntime && pip install -e '.[gpu]'; "
                        "--device cpu checks the CPU provider)")
        if name == "tensorrt":
            if not env["tensorrt"]:
                return "TensorRT not installed"
            if self.kind != "cuda":
                return "TensorRT needs a CUDA GPU"
            if not env["polygraphy"]:
                return "polygraphy is not installed (the plan build needs it)"
        return None

    def estimate(self, name: str) -> float:
        return ESTIMATES[self.kind].get(name, 30) * self.slowness

    # -- driver ------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        import torch

        self.env = environment(self.device)
        for line in environment_lines(self.env, self.kind):
            self.log(line)
        titles = {
            "tiny-fp32": "tiny fp32: eager vs fused torch runtime vs CUDA graph (2 seeds x 2 step counts)",
            "torch-compile": "torch.compile" + (" + CUDA graph" if self.kind == "cuda" else "")
                             + ": parity, no recompilation after the first request",
            "sd2-base-fp16": f"sd2-base shapes fp16, {SD2_STEPS} steps: finite latents and image, runtime vs eager",
            "onnxruntime": "onnxruntime artifacts (tiny stages exported to ONNX) vs eager",
            "tensorrt": "TensorRT fp16 plans (tiny stages) vs eager",
            "customize": "5-step customization (tiny): finite losses, weights updated",
        }
        runners = {"tiny-fp32": self.check_tiny_fp32, "torch-compile": self.check_torch_compile,
                   "sd2-base-fp16": self.check_sd2_fp16, "onnxruntime": self.check_onnxruntime,
                   "tensorrt": self.check_tensorrt, "customize": self.check_customize}
        results = [CheckResult(name, titles[name]) for name in CHECKS]
        failed: CheckResult | None = None
        # fp32 checks compare element-wise: no TF32 on CUDA while they run
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            for i, res in enumerate(results):
                head = f"[{i + 1}/{len(results)}] {res.name}: {res.title}"
                reason = self.not_applicable(res.name)
                if res.name in self.skip:
                    reason = "--skip"
                if reason is None:
                    est, left = self.estimate(res.name), self.remaining()
                    if est > left:
                        reason = f"budget: needs about {est:.0f} s, {max(left, 0):.0f} s left"
                if reason is not None:
                    res.status, res.reason = "skipped", reason
                    self.log(f"{head} ... skipped ({reason})")
                    continue
                self.log(f"{head} ...")
                t = time.perf_counter()
                kept = len(self.timed)
                try:
                    # ladder order is priority: a check that started may use what is left of the budget
                    with time_limit(max(self.remaining() - REPORT_RESERVE_S, 0.01)):
                        res.details = runners[res.name]()
                    res.status = "passed"
                except BudgetExceeded as exc:
                    res.status, res.reason = "skipped", f"budget: {exc}"
                except CheckFailed as exc:
                    res.status, res.reason = "failed", str(exc)
                except Exception as exc:  # any error is this check's finding
                    logger.debug("check %s raised", res.name, exc_info=True)
                    res.status, res.reason = "failed", _first_line(exc)
                res.seconds = time.perf_counter() - t
                if res.status != "passed":
                    del self.timed[kept:]  # time only what passed
                self.log(f"      {res.status.upper()} in {res.seconds:.1f} s"
                         + (f": {res.reason}" if res.reason else f": {summary(res.details)}"))
                if res.status == "failed":
                    failed = res
                    break
            if failed is not None:
                for res in results:
                    if res.status == "not run":
                        res.reason = f"not run: {failed.name} failed"
                timing: list[dict[str, Any]] = []
            elif "timing" in self.skip:
                timing = []
            else:
                timing = self.timing_table()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            self.close()
        return {"device": str(self.device), "device_name": self.env["device_name"], "budget_s": self.budget_s,
                "elapsed_s": time.perf_counter() - self.start, "slowness": self.slowness,
                "environment": self.env, "checks": [asdict(r) for r in results], "timing": timing,
                "timing_request": {"preset": "tiny", "steps": self.timing_steps, "repeats": self.timing_repeats,
                                   "fusion_steps": 1, "batch": 1},
                "failed": None if failed is None else {"check": failed.name, "reason": failed.reason},
                "install": INSTALL_LINES[self.kind]}

    def timing_table(self) -> list[dict[str, Any]]:
        """Every kept backend: one untimed call, then ``timing_repeats`` timed calls; per-step ms (loop) and
        end to end, vs the same configuration's eager row. Rows that do not fit the budget say so."""

        rows: list[dict[str, Any]] = []
        if not self.timed:
            return rows
        self.log(f"timing: {self.timing_repeats} timed call(s) per backend after one untimed call "
                 f"(tiny: {self.timing_steps} steps)")
        for item in self.timed:
            steps = item.request["num_inference_steps"]
            row: dict[str, Any] = {"config": item.config, "backend": item.backend, "steps": steps}
            rows.append(row)
            est = item.call_s * (1 + self.timing_repeats)
            left = self.remaining()
            if est > left:
                row["status"] = f"skipped (budget: about {est:.0f} s, {max(left, 0):.0f} s left)"
                continue
            try:
                with time_limit(max(left - REPORT_RESERVE_S, 0.01)):
                    item.generate(item.request)
                    runs = [item.generate(item.request)[2] for _ in range(max(self.timing_repeats, 1))]
            except BudgetExceeded as exc:
                row["status"] = f"skipped (budget: {exc})"
                continue
            e2e = summarize([r["total_s"] for r in runs])
            loop = summarize([r["loop_s"] for r in runs])
            row.update(status="ok", end_to_end_s=e2e["median_s"], per_step_ms=1000 * loop["median_s"] / steps,
                       samples_s=e2e["samples"])
        for row in rows:
            eager = next((r for r in rows if r["config"] == row["config"] and r["backend"] == "eager"
                          and r.get("status") == "ok"), None)
            if row.get("status") == "ok" and eager is not None:
                row["vs_eager"] = eager["end_to_end_s"] / row["end_to_end_s"]
                row["vs_eager_per_step"] = eager["per_step_ms"] / row["per_step_ms"]
        return rows


