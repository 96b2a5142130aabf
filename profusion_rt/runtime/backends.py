"""Backend factories: a backend name -> the two stage engines. The runtime itself never branches on names."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from ..errors import BackendUnavailableError, InvalidParameterError
from ..models.stages import FUSION_INPUTS, REFINEMENT_INPUTS, FusionStage, RefinementStage
from ..pipeline import ProFusionPipeline
from .engine import Engine
from .runtime import Runtime
from .torch_engine import TorchEngine

logger = logging.getLogger(__name__)

EngineFactory = Callable[..., tuple[Engine, Engine]]


def stage_modules(pipe: ProFusionPipeline) -> tuple[FusionStage, RefinementStage]:
    args = (pipe.unet, pipe.text_encoder, pipe.promptnet, pipe.text_skip_layers)
    return FusionStage(*args).eval(), RefinementStage(*args).eval()


def _torch(pipe: ProFusionPipeline, artifacts: Path | None = None, **_) -> tuple[Engine, Engine]:
    fusion, refinement = stage_modules(pipe)
    return (TorchEngine(fusion, FUSION_INPUTS, name="torch"),
            TorchEngine(refinement, REFINEMENT_INPUTS, name="torch"))


def _torch_compile(pipe: ProFusionPipeline, artifacts: Path | None = None, compile_mode: str | None = None,
                   **_) -> tuple[Engine, Engine]:
    fusion, refinement = stage_modules(pipe)
    return (TorchEngine(fusion, FUSION_INPUTS, compile=True, compile_mode=compile_mode),
            TorchEngine(refinement, REFINEMENT_INPUTS, compile=True, compile_mode=compile_mode))


def _onnxruntime(pipe: ProFusionPipeline, artifacts: Path | None = None, precision: str = "fp32",
                 batch: int = 1, **_) -> tuple[Engine, Engine]:
    from .ort_engine import OrtEngine

    if artifacts is None:
        raise InvalidParameterError("the onnxruntime backend needs an artifact folder (profusion-rt export)")
    paths = [find_onnx(pipe, artifacts, g, precision, batch) for g in ("fusion_stage", "refinement_stage")]
    return OrtEngine(paths[0], device=pipe.device), OrtEngine(paths[1], device=pipe.device)


def _tensorrt(pipe: ProFusionPipeline, artifacts: Path | None = None, precision: str = "fp16",
              batch: int = 1, **_) -> tuple[Engine, Engine]:
    from .trt_engine import TrtEngine, require_tensorrt

    require_tensorrt()
    if artifacts is None:
        raise InvalidParameterError("the tensorrt backend needs an artifact folder (profusion-rt export --backend tensorrt)")
    plans = [find_plan(pipe, artifacts, g, precision, batch) for g in ("fusion_stage", "refinement_stage")]
    return TrtEngine(plans[0], device=pipe.device), TrtEngine(plans[1], device=pipe.device)


BACKENDS: dict[str, EngineFactory] = {
    "torch": _torch,
    "torch-compile": _torch_compile,
    "onnxruntime": _onnxruntime,
    "tensorrt": _tensorrt,
}


def find_onnx(pipe, artifacts: Path, graph: str, precision: str, batch: int) -> Path:
    from ..artifacts import store

    return store.locate_onnx(Path(artifacts), pipe, graph, precision, batch)


def find_plan(pipe, artifacts: Path, graph: str, precision: str, batch: int) -> Path:
    from ..artifacts import store

    return store.locate_plan(Path(artifacts), pipe, graph, precision, batch)


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
