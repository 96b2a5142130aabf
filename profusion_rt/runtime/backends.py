"""Backend factories: a backend name -> the two stage engines. The runtime itself never branches on names."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from profusion_rt.artifacts.store import ArtifactStore, model_hash
from profusion_rt.core.errors import (
    BackendUnavailableError,
    InvalidParameterError,
    ModelLoadError,
)
from profusion_rt.models.stages import (
    FUSION_INPUTS,
    REFINEMENT_INPUTS,
    FusionStage,
    RefinementStage,
)
from profusion_rt.pipeline import ProFusionPipeline
from profusion_rt.runtime.engine import Engine
from profusion_rt.runtime.ort_engine import OrtEngine
from profusion_rt.runtime.runtime import Runtime
from profusion_rt.runtime.torch_engine import TorchEngine
from profusion_rt.runtime.trt_engine import TrtEngine, TrtResources, require_tensorrt

logger = logging.getLogger(__name__)

EngineFactory = Callable[..., tuple[Engine, Engine]]


def stage_modules(pipe: ProFusionPipeline) -> tuple[FusionStage, RefinementStage]:
    # for the prediction type (ε or v) of the pipeline's scheduler config
    return FusionStage.from_pipeline(pipe), RefinementStage.from_pipeline(pipe)


def _torch(pipe: ProFusionPipeline, artifacts: Path | None = None, **_) -> tuple[Engine, Engine]:
    fusion, refinement = stage_modules(pipe)
    return (TorchEngine(fusion, FUSION_INPUTS, name="torch"),
            TorchEngine(refinement, REFINEMENT_INPUTS, name="torch"))


def _torch_compile(pipe: ProFusionPipeline, artifacts: Path | None = None, compile_mode: str | None = None,
                   **_) -> tuple[Engine, Engine]:
    fusion, refinement = stage_modules(pipe)
    return (TorchEngine(fusion, FUSION_INPUTS, compile=True, compile_mode=compile_mode),
            TorchEngine(refinement, REFINEMENT_INPUTS, compile=True, compile_mode=compile_mode))


#: the two graphs a runtime's loop runs
STAGE_GRAPHS = ("fusion_stage", "refinement_stage")


def onnxruntime_engine(entry, device: torch.device | str, threads: int | None = None) -> Engine:
    """An :class:`~.ort_engine.OrtEngine` over one artifact: the onnxruntime-specific graph (fused
    attention) when the export wrote one, else the optimized, else the exported one."""

    path = entry.ort_onnx_path or entry.opt_onnx_path or entry.onnx_path
    return OrtEngine(path, device=device, threads=threads,
                     batch_range=entry.dynamic_batch or (entry.batch, entry.batch))


def tensorrt_engine(entry, device: torch.device | str, resources=None, **_) -> Engine:
    """A :class:`~.trt_engine.TrtEngine` over the plan of one artifact built for this GPU and TensorRT.
    ``resources``: the :class:`~.trt_engine.TrtResources` (stream, activation memory) of the runtime the
    engine belongs to; by default the engine gets its own."""

    trt = require_tensorrt()
    resources = resources or TrtResources(device)
    gpu = torch.cuda.get_device_name(device)
    cc = torch.cuda.get_device_capability(device)
    plan = entry.plan_path(gpu, trt.__version__, cc)
    if plan is None:
        raise BackendUnavailableError(
            f"no TensorRT plan of {entry.graph} for {gpu} and TensorRT {trt.__version__} in {entry.path}; "
            "build it with `profusion-rt export --backend tensorrt`")
    return TrtEngine(plan, device=device, onnx_path=entry.opt_onnx_path or entry.onnx_path,
                     batch_range=entry.dynamic_batch or (entry.batch, entry.batch), resources=resources)


#: what onnxruntime runs (its CPU provider has no bf16 kernels: MatMul, Add, Softmax are not implemented for
#: bfloat16 in onnxruntime 1.23, and ONNX Conv takes bfloat16 only from opset 22)
ORT_PRECISIONS = ("fp32", "fp16")


def check_onnxruntime_precision(precision: str) -> None:
    """:class:`InvalidParameterError` naming the supported combinations for a precision onnxruntime does not
    run (bf16)."""
    if precision not in ORT_PRECISIONS:
        raise InvalidParameterError(
            f"onnxruntime runs fp32 (and fp16) artifacts only, not {precision}: bf16 runs on the torch backends "
            "(--backend eager, torch or torch-compile with --precision bf16) and in TensorRT 10 plans")


def _onnxruntime(pipe: ProFusionPipeline, artifacts: Path | None = None, precision: str = "fp32",
                 threads: int | None = None, **_) -> tuple[Engine, Engine]:
    check_onnxruntime_precision(precision)
    if artifacts is None:
        raise InvalidParameterError("the onnxruntime backend needs an artifact folder (profusion-rt export)")
    digest = artifact_model_hash(pipe)
    fusion, refinement = (onnxruntime_engine(select_artifact(artifacts, digest, graph, precision), pipe.device,
                                             threads) for graph in STAGE_GRAPHS)
    return fusion, refinement


def _tensorrt(pipe: ProFusionPipeline, artifacts: Path | None = None, precision: str = "fp16",
              **_) -> tuple[Engine, Engine]:
    require_tensorrt()
    if artifacts is None:
        raise InvalidParameterError("the tensorrt backend needs an artifact folder (profusion-rt export --backend tensorrt)")
    digest = artifact_model_hash(pipe)
    resources = TrtResources(pipe.device)  # one stream and one activation allocation for this runtime's engines
    fusion, refinement = (tensorrt_engine(select_artifact(artifacts, digest, graph, precision), pipe.device,
                                          resources=resources)
                          for graph in STAGE_GRAPHS)
    return fusion, refinement


def artifact_model_hash(pipe: ProFusionPipeline) -> str:
    """The model hash exported artifacts are matched by, one rule for every precision: the hash of the
    float32 weights (export always reads a float32 pipeline; an fp16 or bf16 artifact is derived from it).
    A pipeline held in another dtype cannot reproduce that hash, so it is refused with the fix; the engines'
    precision is chosen separately (``precision=``), and the runtime's buffers take the engines' dtypes."""
    if pipe.dtype != torch.float32:
        raise InvalidParameterError(
            f"artifacts are matched by the float32 weights' hash, and this pipeline holds {pipe.dtype}: load it "
            "in float32 (--dtype fp32) and choose the engines' precision with --precision (fp16 by default for "
            "tensorrt)")
    return model_hash(pipe)


def pick_artifact(entries, graph: str, precision: str):
    """Among intact artifact ``entries``, the one of ``graph`` at ``precision``, preferring a dynamic batch
    axis and then the widest batch range; None when there is none."""
    found = [e for e in entries if e.graph == graph and e.precision == precision]
    found.sort(key=lambda e: (e.dynamic_batch is None, -(e.dynamic_batch or (0, e.batch))[1]))
    return found[0] if found else None


def select_artifact(root: Path, digest: str, graph: str, precision: str):
    """The intact exported artifact of ``graph`` for exactly these weights (by model hash), preferring a
    dynamic batch axis; :class:`ModelLoadError` naming what is missing otherwise. The hash covers the
    weights in the dtype they are held in, and export reads a float32 pipeline: load the pipeline in
    float32 for the onnxruntime and tensorrt backends (the engines carry their own precision)."""

    root = Path(root)
    if not root.is_dir():
        raise ModelLoadError(f"artifact folder {root} does not exist")
    entry = pick_artifact(ArtifactStore(root).entries(digest, verify="hash"), graph, precision)
    if entry is None:
        raise ModelLoadError(
            f"no intact {precision} '{graph}' artifact for these weights (model {digest}) in {root}; "
            f"run `profusion-rt export --model ... --out {root} --precision {precision}`")
    return entry


BACKENDS: dict[str, EngineFactory] = {
    "torch": _torch,
    "torch-compile": _torch_compile,
    "onnxruntime": _onnxruntime,
    "tensorrt": _tensorrt,
}


def available_backends(device: torch.device | str = "cpu", artifacts: Path | None = None) -> dict[str, str]:
    """Backend name -> "" if usable here, else the reason it is not."""
    out: dict[str, str] = {"torch": "", "torch-compile": ""}
    try:
        import onnxruntime  # noqa: F401

        out["onnxruntime"] = "" if artifacts is not None else "needs exported artifacts"
    except ImportError:
        out["onnxruntime"] = "onnxruntime is not installed"
    try:
        import tensorrt  # noqa: F401

        out["tensorrt"] = "" if torch.device(device).type == "cuda" else "needs a CUDA device"
    except ImportError:
        out["tensorrt"] = "tensorrt is not installed"
    return out


def create_runtime(pipe: ProFusionPipeline, backend: str = "torch", artifacts: str | Path | None = None,
                   use_cuda_graph: bool | None = None, **options) -> Runtime:
    """A :class:`Runtime` over ``pipe`` with the named backend's stage engines."""
    try:
        factory = BACKENDS[backend]
    except KeyError:
        raise InvalidParameterError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}") from None
    fusion, refinement = factory(pipe, artifacts=None if artifacts is None else Path(artifacts), **options)
    return Runtime(pipe, fusion, refinement, backend=backend, use_cuda_graph=use_cuda_graph)
