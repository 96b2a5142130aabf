"""TrtEngine: a TensorRT plan executed with ``execute_async_v3`` on static device buffers.

TensorRT cannot be installed on the machines this project is built on, so this module has NOT been
executed; it is written against TensorRT 10's documented Python API and gated: without ``tensorrt`` (or
without CUDA) it raises :class:`BackendUnavailableError` with one clear line.

* Tensor addresses are set once per buffer set (``set_tensor_address``), shapes with ``set_input_shape``.
* Activation memory: contexts are created with the ``USER_MANAGED`` allocation strategy and all engines
  of one runtime share one device allocation sized to the largest ``device_memory_size_v2``
  (the stages run one after another on one stream).
* Hot-swap of weights: ``Refitter.set_named_weights`` + ``refit_cuda_engine`` on a refittable plan.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch

from ..errors import BackendUnavailableError

logger = logging.getLogger(__name__)


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(
            "TensorRT is not installed (pip install 'profusion-rt[tensorrt]' on a machine with an NVIDIA GPU)"
        ) from exc
    if not torch.cuda.is_available():
        raise BackendUnavailableError("the tensorrt backend needs a CUDA GPU; none is visible")
    return trt


class SharedActivationMemory:
    """One device allocation reused by every context of a runtime."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffer = torch.empty(0, dtype=torch.uint8, device=device)

    def reserve(self, size: int) -> torch.Tensor:
        if size > self.buffer.numel():
            self.buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
        return self.buffer


_SHARED: dict[torch.device, SharedActivationMemory] = {}


class TrtEngine:
    graph_capturable = True  # execute_async_v3 enqueues kernels only
    name = "tensorrt"

    def __init__(self, plan_path: str | Path, device: str | torch.device = "cuda",
                 batch_range: tuple[int, int] | None = None, onnx_path: str | Path | None = None):
        trt = require_tensorrt()
        self.batch_range = batch_range
        self.onnx_path = None if onnx_path is None else Path(onnx_path)
        self._weight_map = None
        self.trt = trt
        self.device = torch.device(device)
        self.path = Path(plan_path)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise BackendUnavailableError(
                f"TensorRT could not load {self.path.name}: built for another TensorRT version or GPU; rebuild it"
            )
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self.context = self.engine.create_execution_context(strategy)
        size = int(getattr(self.engine, "device_memory_size_v2", self.engine.device_memory_size))
        shared = _SHARED.setdefault(self.device, SharedActivationMemory(self.device))
        self._activation = shared.reserve(size)
        self.context.set_device_memory(self._activation.data_ptr(), size)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) != mode]

    def run(self, feeds: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        for name in self.input_names:
            t = feeds[name]
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        for name in self.output_names:
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream(self.device).cuda_stream
        if not self.context.execute_async_v3(stream):
            raise RuntimeError(f"TensorRT execution of {self.path.name} failed")

    needs_base_values = True

    def update_weights(self, named_tensors: Mapping[str, torch.Tensor],
                       base: Mapping[str, torch.Tensor] | None = None) -> None:
        """Refit: TensorRT names refittable weights after the ONNX initializers, located as for
        onnxruntime (:func:`~profusion_rt.runtime.ort_engine.weight_map`)."""
        from .ort_engine import graph_weights, weight_map

        if not self.engine.refittable:
            raise BackendUnavailableError(f"{self.path.name} was not built refittable (export with --refittable)")
        if self.onnx_path is None:
            raise BackendUnavailableError(f"{self.path.name}: no ONNX file to locate the weights to refit")
        if self._weight_map is None:
            self._weight_map = weight_map(self.onnx_path, base)
        refitter = self.trt.Refitter(self.engine, self.logger)
        keep = []
        for name, arr in graph_weights(self._weight_map, named_tensors):
            keep.append(arr)  # TensorRT reads the host memory during refit
            refitter.set_named_weights(name, self.trt.Weights(arr))
        if not refitter.refit_cuda_engine():
            raise RuntimeError(f"TensorRT refit of {self.path.name} failed")
