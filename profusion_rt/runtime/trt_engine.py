"""TrtEngine: a TensorRT plan executed with ``execute_async_v3`` on the runtime's static buffers.

TensorRT cannot be installed on the machines this project is built on, so this module has NOT been executed
against the real library. It is written against the TensorRT 10 and 11 Python APIs (differences are
feature-detected, never decided by comparing version strings) and checked on CPU against a fake ``tensorrt``
that enforces the library's contract (``tests/runtime/fake_tensorrt.py``). Without ``tensorrt`` it raises
:class:`BackendUnavailableError` with one clear line.

Lifecycle (as NVIDIA's demo/Diffusion engine): **load** the plan (``deserialize_cuda_engine``), **activate**
a context with user-managed device memory (:class:`TrtResources`: one allocation per runtime, sized to the
largest engine, shared by the runtime's contexts, which run one after another on one stream), **allocate**
buffers (the runtime asks :meth:`TrtEngine.tensor_dtype` for each tensor's dtype and aligns every address to
256 bytes), **infer** (``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3`` on a dedicated
stream ordered after and before torch's current stream). Every call whose result says whether it worked
is checked; a refusal raises :class:`EngineError` naming the tensor.

Hot-swap of weights (refit): the delta's weights are located in the plan's ONNX file (the same map as for
onnxruntime), set with ``Refitter.set_named_weights`` (a False result raises), the weights TensorRT reports
in ``get_missing_weights()`` (fused with a changed one at build time) are supplied at their current values,
and ``refit_cuda_engine`` must succeed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from profusion_rt.core.errors import BackendUnavailableError, EngineError
from profusion_rt.runtime.engine import ALIGNMENT, aligned_empty
from profusion_rt.runtime.ort_engine import graph_weights, weight_map

logger = logging.getLogger(__name__)

#: TensorRT DataType member name -> torch dtype (looked up on the installed module)
_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
           "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}


def tensorrt_available() -> bool:
    """Whether the ``tensorrt`` module can be imported here."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def require_tensorrt():
    """The one TensorRT gate (the runtime and export): the ``tensorrt`` module, or
    :class:`BackendUnavailableError` saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(
            "TensorRT is not installed (pip install 'profusion-rt[tensorrt]' on a machine with an NVIDIA GPU; "
            "the onnxruntime backend works without it)"
        ) from exc
    return trt


def torch_dtype_of(trt, data_type) -> torch.dtype:
    """The torch dtype of a TensorRT ``DataType``."""
    for name, dtype in _DTYPES.items():
        if getattr(trt.DataType, name, None) == data_type:
            return dtype
    raise EngineError(f"TensorRT data type {data_type} has no torch equivalent here")


def device_memory_size(engine) -> int:
    """Activation memory an engine's context needs: ``device_memory_size_v2`` (TensorRT >= 10.1, the only
    one in 11), else ``device_memory_size`` (10.0)."""
    size = getattr(engine, "device_memory_size_v2", None)
    if size is None:
        size = engine.device_memory_size
    return int(size)


def set_device_memory(context, address: int, size: int) -> None:
    """Give a ``USER_MANAGED`` context its activation memory: ``set_device_memory(ptr, size)`` (TensorRT
    >= 10.1, 11), else the ``device_memory`` property (10.0)."""
    if hasattr(context, "set_device_memory"):
        context.set_device_memory(address, size)
    else:
        context.device_memory = address


class CudaStream:
    """A dedicated CUDA stream for TensorRT (never the legacy default stream), ordered after torch's current
    stream before a run and before it after the run, so the runtime's copies and CUDA-graph capture see one
    ordered sequence."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def begin(self) -> int:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        return self.stream.cuda_stream

    def end(self) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self.stream)


class ActivationMemory:
    """One device allocation for the contexts of one runtime (their stages run one after another). When an
    engine needs more than the current size, the allocation grows and every context is pointed at it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.size = 0
        self.buffer: torch.Tensor | None = None
        self.contexts: list = []

    def attach(self, context, size: int) -> None:
        self.contexts.append(context)
        if self.buffer is None or size > self.size:
            self.size = max(int(size), 1)
            self.buffer = aligned_empty((self.size,), torch.uint8, self.device)
            for ctx in self.contexts:
                set_device_memory(ctx, self.buffer.data_ptr(), self.size)
        else:
            set_device_memory(context, self.buffer.data_ptr(), self.size)


class TrtResources:
    """What the engines of ONE runtime share: the stream they run on and their activation memory. Never
    share it between runtimes (two runtimes run concurrently on their own streams)."""

    def __init__(self, device: torch.device | str, stream=None):
        self.device = torch.device(device)
        if stream is None:
            if self.device.type != "cuda" or not torch.cuda.is_available():
                raise BackendUnavailableError("the tensorrt backend needs a CUDA GPU; none is visible")
            stream = CudaStream(self.device)
        #: ``begin() -> stream handle`` before a run, ``end()`` after it (:class:`CudaStream` on a GPU)
        self.stream = stream
        self.memory = ActivationMemory(self.device)


class TrtEngine:
    graph_capturable = True  # execute_async_v3 enqueues kernels only
    name = "tensorrt"
    needs_base_values = True

    def __init__(self, plan_path: str | Path, device: str | torch.device = "cuda",
                 batch_range: tuple[int, int] | None = None, onnx_path: str | Path | None = None,
                 resources: TrtResources | None = None):
        trt = require_tensorrt()
        self.trt = trt
        self.device = torch.device(device)
        self.resources = resources or TrtResources(self.device)
        self.batch_range = batch_range
        self.path = Path(plan_path)
        self.onnx_path = None if onnx_path is None else Path(onnx_path)
        self._weight_map = None
        self._refitted: dict[str, np.ndarray] = {}  # initializer -> value last refitted (host copy)
        # load
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise BackendUnavailableError(
                f"TensorRT could not load {self.path.name}: built for another TensorRT version or GPU; rebuild it")
        # activate
        self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.context is None:
            raise EngineError(f"TensorRT could not create an execution context for {self.path.name}")
        self.resources.memory.attach(self.context, device_memory_size(self.engine))
        # I/O tensors: names, dtypes, profile shapes
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.dtypes = {n: torch_dtype_of(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.profiles = {n: tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(n, 0))
                         for n in self.input_names}

    def tensor_dtype(self, name: str) -> torch.dtype | None:
        return self.dtypes.get(name)

    # -- infer -----------------------------------------------------------------------------------------
    def _check(self, name: str, t: torch.Tensor) -> None:
        if t.dtype != self.dtypes[name]:
            raise EngineError(f"{self.path.name}: tensor {name} is {t.dtype}, the engine takes "
                              f"{self.dtypes[name]} (buffers must take the engine's dtypes)")
        if t.device.type != self.device.type or not t.is_contiguous():
            raise EngineError(f"{self.path.name}: tensor {name} must be contiguous on {self.device}")
        if t.data_ptr() % ALIGNMENT:
            raise EngineError(f"{self.path.name}: tensor {name} is at an address not aligned to {ALIGNMENT} "
                              "bytes, which TensorRT requires")

    def run(self, feeds: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        ctx = self.context
        for name in self.input_names:
            t = feeds[name]
            self._check(name, t)
            if not ctx.set_input_shape(name, tuple(t.shape)):
                lo, _, hi = self.profiles[name]
                raise EngineError(f"{self.path.name}: input {name} of shape {tuple(t.shape)} is outside the "
                                  f"engine's profile {lo}..{hi}")
            if not ctx.set_tensor_address(name, t.data_ptr()):
                raise EngineError(f"{self.path.name}: TensorRT refused the address of input {name}")
        for name in self.output_names:
            t = outputs[name]
            self._check(name, t)
            shape = tuple(ctx.get_tensor_shape(name))
            if shape != tuple(t.shape):
                raise EngineError(f"{self.path.name}: output {name} buffer has shape {tuple(t.shape)}, the engine "
                                  f"writes {shape}")
            if not ctx.set_tensor_address(name, t.data_ptr()):
                raise EngineError(f"{self.path.name}: TensorRT refused the address of output {name}")
        handle = self.resources.stream.begin()
        ok = ctx.execute_async_v3(handle)
        self.resources.stream.end()
        if not ok:
            raise EngineError(f"TensorRT execution of {self.path.name} failed (see the TensorRT log above)")

    # -- refit -----------------------------------------------------------------------------------------
    def update_weights(self, named_tensors: Mapping[str, torch.Tensor],
                       base: Mapping[str, torch.Tensor] | None = None) -> None:
        """Refit: TensorRT names refittable weights after the ONNX initializers, located as for
        onnxruntime (:func:`~profusion_rt.runtime.ort_engine.weight_map`). Weights TensorRT fused with a
        changed one (``get_missing_weights``) are supplied at their current values; any refusal raises."""

        if not self.engine.refittable:
            raise BackendUnavailableError(f"{self.path.name} was not built refittable (export with --refittable)")
        if self.onnx_path is None:
            raise BackendUnavailableError(f"{self.path.name}: no ONNX file to locate the weights to refit")
        if self._weight_map is None:
            self._weight_map = weight_map(self.onnx_path, base)
        refitter = self.trt.Refitter(self.engine, self.logger)
        supplied: dict[str, np.ndarray] = {}  # TensorRT reads this host memory during the refit: keep it

        def supply(name: str, arr: np.ndarray) -> None:
            arr = np.ascontiguousarray(arr)
            supplied[name] = arr
            if not refitter.set_named_weights(name, self.trt.Weights(arr)):
                raise EngineError(f"TensorRT refit of {self.path.name}: weight {name} was refused "
                                  f"(not refittable, or of another size or type)")

        for name, arr in graph_weights(self._weight_map, named_tensors):
            supply(name, arr)
        missing = [n for n in refitter.get_missing_weights() if n not in supplied]
        if missing:
            current = self._current_weights(missing)
            for name in missing:
                supply(name, current[name])
        still = list(refitter.get_missing_weights())
        if still:
            raise EngineError(f"TensorRT refit of {self.path.name}: {len(still)} weights still missing "
                              f"(e.g. {still[0]})")
        if not refitter.refit_cuda_engine():
            raise EngineError(f"TensorRT refit of {self.path.name} failed (see the TensorRT log above)")
        self._refitted.update(supplied)
        logger.info("%s refitted: %d weights (%d of them supplied because TensorRT fused them)", self.path.name,
                    len(supplied), len(missing))

    def _current_weights(self, names: list[str]) -> dict[str, np.ndarray]:
        """The engine's current values of ``names``: the last refitted value, else the ONNX initializer the
        plan was built from."""
        out = {n: self._refitted[n] for n in names if n in self._refitted}
        rest = [n for n in names if n not in out]
        if rest:
            import onnx
            from onnx import numpy_helper

            wanted = set(rest)
            model = onnx.load(str(self.onnx_path))
            for init in model.graph.initializer:
                if init.name in wanted:
                    out[init.name] = numpy_helper.to_array(init)
            lost = [n for n in rest if n not in out]
            if lost:
                raise EngineError(f"TensorRT refit of {self.path.name} needs weight {lost[0]}, which is not an "
                                  f"initializer of {self.onnx_path.name}; rebuild the plan from the new weights")
        return out
