"""A fake ``tensorrt`` module for contract tests on CPU (lives with the tests; the product never imports it).

It implements the subset of the TensorRT 10 / 11 Python API that :mod:`profusion_rt.runtime.trt_engine` uses
(``Runtime``, ``ICudaEngine``, ``IExecutionContext``, ``Refitter``, ``Logger``, ``Weights``, ``DataType``,
``TensorIOMode``, ``ExecutionContextAllocationStrategy``, ``BuilderFlag``), records every call, and enforces
what the real library enforces instead of trusting the caller:

* tensors are read from and written to raw addresses, in the dtype the *engine* declares for each I/O tensor
  (the real library never sees a torch dtype: bytes of another dtype are read as garbage, silently);
* ``set_tensor_address`` returns False for an unknown name or an address not aligned to 256 bytes, and the
  address is then not set; ``set_input_shape`` returns False for an unknown name, an output, or a shape
  outside the optimization profile; ``execute_async_v3`` returns False when an I/O tensor has no address or
  an input no shape, or when the context's device memory is missing or too small;
* refit: ``set_named_weights`` returns False for a name that is not refittable or a wrong size;
  ``refit_cuda_engine`` returns False while ``get_missing_weights()`` is not empty (weights the engine fused
  together must be supplied together: the plan declares groups);
* API differences: TensorRT 11 has no ``ICudaEngine.device_memory_size`` and no ``BuilderFlag.BF16``;
  TensorRT 10.0 has neither ``device_memory_size_v2`` nor ``IExecutionContext.set_device_memory``.

A plan is registered with :meth:`FakeTensorRT.register_plan` (the plan file holds a key); its ``compute``
callable gets the input tensors (CPU, the engine's dtypes) and returns the outputs.
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import types
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

ALIGNMENT = 256


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    BF16 = 7
    INT64 = 8


TORCH_OF = {DataType.FLOAT: torch.float32, DataType.HALF: torch.float16, DataType.BF16: torch.bfloat16,
            DataType.INT32: torch.int32, DataType.INT64: torch.int64, DataType.BOOL: torch.bool,
            DataType.INT8: torch.int8}
TRT_OF = {v: k for k, v in TORCH_OF.items()}


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ExecutionContextAllocationStrategy(enum.Enum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class Logger:
    VERBOSE, INFO, WARNING, ERROR, INTERNAL_ERROR = range(5)

    def __init__(self, severity=WARNING):
        self.severity = severity
        self.errors: list[str] = []

    def log(self, msg: str) -> None:
        self.errors.append(msg)


class Weights:
    def __init__(self, a: np.ndarray):
        if not isinstance(a, np.ndarray):
            raise TypeError("Weights takes a numpy array")
        self.numpy_ = np.ascontiguousarray(a)

    @property
    def size(self) -> int:
        return self.numpy_.size

    def numpy(self) -> np.ndarray:
        return self.numpy_


@dataclass
class IOTensor:
    name: str
    mode: TensorIOMode
    dtype: torch.dtype
    #: (min, opt, max) shapes for inputs; for outputs a function of the input shapes
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None
    output_shape: Callable[[dict[str, tuple[int, ...]]], tuple[int, ...]] | None = None


@dataclass
class FakePlan:
    tensors: list[IOTensor]
    compute: Callable[[dict[str, torch.Tensor], dict[str, np.ndarray]], dict[str, torch.Tensor]]
    device_memory: int = 4096
    refittable: bool = False
    #: refittable weights: name -> array (the plan's current values)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    #: groups of weight names the builder fused: setting one makes the others of its group missing
    groups: list[frozenset[str]] = field(default_factory=list)


def tensor_at(address: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The memory at ``address`` read as a tensor of ``shape`` and ``dtype`` (shares the memory), as the
    real library reads device memory: whatever was written there, in the engine's dtype."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = int(np.prod(shape)) if shape else 1
    buf = (ctypes.c_char * (numel * itemsize)).from_address(address)
    return torch.frombuffer(buf, dtype=dtype, count=numel).reshape(shape)


class ICudaEngine:
    def __init__(self, module: "FakeTensorRT", plan: FakePlan):
        self._module = module
        self.plan = plan
        self._by_name = {t.name: t for t in plan.tensors}
        self.contexts: list[IExecutionContext] = []

    # -- API -------------------------------------------------------------------------------------------
    @property
    def num_io_tensors(self) -> int:
        return len(self.plan.tensors)

    @property
    def num_optimization_profiles(self) -> int:
        return 1

    @property
    def refittable(self) -> bool:
        return self.plan.refittable

    def get_tensor_name(self, index: int) -> str:
        return self.plan.tensors[index].name

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        t = self._by_name.get(name)
        return TensorIOMode.NONE if t is None else t.mode

    def get_tensor_dtype(self, name: str) -> DataType:
        return TRT_OF[self._by_name[name].dtype]

    def get_tensor_profile_shape(self, name: str, profile_index: int):
        t = self._by_name[name]
        if t.mode != TensorIOMode.INPUT or profile_index != 0:
            raise RuntimeError(f"no profile shape for {name}")
        return [tuple(s) for s in t.profile]

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        ctx = self._module._context_cls(self, strategy)
        self.contexts.append(ctx)
        self._module.calls.append(("create_execution_context", strategy))
        return ctx


class IExecutionContext:
    def __init__(self, engine: ICudaEngine, strategy):
        self.engine = engine
        self.strategy = strategy
        self.addresses: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.memory: tuple[int, int] | None = None if strategy == ExecutionContextAllocationStrategy.USER_MANAGED \
            else (0, engine.plan.device_memory)
        self.streams: list[int] = []
        self.executions = 0

    def _log(self, *call):
        self.engine._module.calls.append(call)

    def _set_memory(self, address: int, size: int) -> None:
        self._log("set_device_memory", address, size)
        self.memory = (int(address), int(size))

    def set_input_shape(self, name: str, shape) -> bool:
        self._log("set_input_shape", name, tuple(shape))
        t = self.engine._by_name.get(name)
        shape = tuple(int(d) for d in shape)
        if t is None or t.mode != TensorIOMode.INPUT:
            return False
        lo, _, hi = t.profile
        if len(shape) != len(lo) or any(not a <= d <= b for a, d, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = shape
        return True

    def set_tensor_address(self, name: str, memory: int) -> bool:
        self._log("set_tensor_address", name, int(memory))
        if name not in self.engine._by_name or int(memory) % ALIGNMENT:
            return False
        self.addresses[name] = int(memory)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        """An input's shape as set; an output's as computed from the input shapes ((-1,) before they are)."""
        t = self.engine._by_name[name]
        if t.mode == TensorIOMode.INPUT:
            return self.shapes.get(name, (-1,))
        inputs = [x.name for x in self.engine.plan.tensors if x.mode == TensorIOMode.INPUT]
        return t.output_shape(self.shapes) if all(n in self.shapes for n in inputs) else (-1,)

    def get_tensor_address(self, name: str) -> int:
        return self.addresses.get(name, 0)

    def execute_async_v3(self, stream_handle: int) -> bool:
        self._log("execute_async_v3", int(stream_handle))
        plan = self.engine.plan
        if self.memory is None or self.memory[1] < plan.device_memory or self.memory[0] % ALIGNMENT:
            return False
        inputs = [t for t in plan.tensors if t.mode == TensorIOMode.INPUT]
        outputs = [t for t in plan.tensors if t.mode == TensorIOMode.OUTPUT]
        if any(t.name not in self.addresses for t in plan.tensors) or any(t.name not in self.shapes for t in inputs):
            return False
        feeds = {t.name: tensor_at(self.addresses[t.name], self.shapes[t.name], t.dtype).clone() for t in inputs}
        results = plan.compute(feeds, plan.weights)
        for t in outputs:
            out = tensor_at(self.addresses[t.name], t.output_shape(self.shapes), t.dtype)
            out.copy_(results[t.name].to(t.dtype))
        self.streams.append(int(stream_handle))
        self.executions += 1
        return True


class _Context10_0(IExecutionContext):
    """TensorRT 10.0: device memory through the ``device_memory`` property only."""

    @property
    def device_memory(self):
        return None if self.memory is None else self.memory[0]

    @device_memory.setter
    def device_memory(self, address: int) -> None:
        self._set_memory(address, self.engine.plan.device_memory)  # 10.0 trusts the size


class _Context10(IExecutionContext):
    def set_device_memory(self, memory: int, size: int) -> None:
        self._set_memory(memory, size)

    @property
    def device_memory(self):  # still there (deprecated) in 10.x
        return None if self.memory is None else self.memory[0]

    @device_memory.setter
    def device_memory(self, address: int) -> None:
        self._set_memory(address, self.engine.plan.device_memory)


class _Context11(IExecutionContext):
    def set_device_memory(self, memory: int, size: int) -> None:
        self._set_memory(memory, size)


class Refitter:
    def __init__(self, engine: ICudaEngine, logger: Logger):
        self.engine = engine
        self.logger = logger
        self.pending: dict[str, np.ndarray] = {}
        engine._module.calls.append(("Refitter",))
        engine._module.refitters.append(self)

    def set_named_weights(self, name: str, weights: Weights) -> bool:
        self.engine._module.calls.append(("set_named_weights", name))
        current = self.engine.plan.weights.get(name)
        arr = weights.numpy()
        if current is None or arr.size != current.size or arr.dtype != current.dtype:
            self.logger.log(f"set_named_weights: {name} is not a refittable weight of this size and type")
            return False
        self.pending[name] = arr.reshape(current.shape).copy()
        return True

    def get_missing_weights(self) -> list[str]:
        touched = set(self.pending)
        need = set().union(*(g for g in self.engine.plan.groups if g & touched)) if touched else set()
        return sorted(need - touched)

    def get_all_weights(self) -> list[str]:
        return sorted(self.engine.plan.weights)

    def refit_cuda_engine(self) -> bool:
        self.engine._module.calls.append(("refit_cuda_engine",))
        if self.get_missing_weights():
            return False
        self.engine.plan.weights.update(self.pending)
        self.pending = {}
        return True


class FakeTensorRT(types.ModuleType):
    """One fake ``tensorrt`` module of a given version ("10.0.1", "10.8.0", "11.0.0")."""

    _keys = itertools.count()

    def __init__(self, version: str = "10.8.0"):
        super().__init__("tensorrt")
        self.__version__ = version
        major, minor = (int(v) for v in version.split(".")[:2])
        self.major = major
        self.calls: list[tuple] = []
        self.refitters: list[Refitter] = []
        self.plans: dict[bytes, FakePlan] = {}
        self.engines: list[ICudaEngine] = []
        self.DataType = DataType
        self.TensorIOMode = TensorIOMode
        self.ExecutionContextAllocationStrategy = ExecutionContextAllocationStrategy
        self.Logger = Logger
        self.Weights = Weights
        self.Refitter = Refitter
        flags = ["TF32", "REFIT", "STRIP_PLAN"] + (["FP16", "BF16", "INT8"] if major < 11 else [])
        self.BuilderFlag = enum.Enum("BuilderFlag", flags)
        if major >= 11:
            self._engine_cls = _Engine11
            self._context_cls = _Context11
        elif minor == 0:
            self._engine_cls = _Engine10_0
            self._context_cls = _Context10_0
        else:
            self._engine_cls = _Engine10
            self._context_cls = _Context10
        module = self

        class Runtime:
            def __init__(self, logger):
                self.logger = logger

            def deserialize_cuda_engine(self, data: bytes):
                plan = module.plans.get(bytes(data))
                if plan is None:
                    return None
                engine = module._engine_cls(module, plan)
                module.engines.append(engine)
                return engine

        self.Runtime = Runtime

    def register_plan(self, plan: FakePlan) -> bytes:
        key = f"FAKE-TRT-PLAN-{next(self._keys)}".encode()
        self.plans[key] = plan
        return key


class _Engine10_0(ICudaEngine):
    """TensorRT 10.0: ``device_memory_size`` only."""

    @property
    def device_memory_size(self) -> int:
        return self.plan.device_memory


class _Engine10(_Engine10_0):
    @property
    def device_memory_size_v2(self) -> int:
        return self.plan.device_memory


class _Engine11(ICudaEngine):
    """TensorRT 11: ``device_memory_size`` is gone."""

    @property
    def device_memory_size_v2(self) -> int:
        return self.plan.device_memory
