"""OrtEngine: an ONNX graph run by onnxruntime with IO binding on the runtime's static buffers.

On CUDA the session's CUDA provider gets the device index (``device_id``) and torch's current stream
(``user_compute_stream``), so onnxruntime's kernels are queued behind the runtime's copies on the same stream;
a run from another torch stream than the one the session was created on first waits for that stream
(``synchronize``). None of the CUDA paths has been executed yet (no GPU where this was built); they are
checked against onnxruntime's documented provider options by ``tests/runtime/test_ort_cuda_contract.py``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from profusion_rt.core.errors import BackendUnavailableError, EngineError

logger = logging.getLogger(__name__)

_ORT_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
              torch.int32: np.int32, torch.bool: np.bool_}
#: onnxruntime's type strings of graph inputs and outputs -> torch dtypes
_TORCH_OF_ORT = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16,
                 "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bool)": torch.bool}


def import_onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise BackendUnavailableError(
            "onnxruntime is not installed (pip install 'profusion-rt[onnx]', or onnxruntime-gpu for CUDA)"
        ) from exc
    return ort


def cuda_device_index(device: torch.device) -> int:
    device = torch.device(device)
    return torch.cuda.current_device() if device.index is None else int(device.index)


def current_stream_handle(device: torch.device) -> int:
    """The handle of torch's current CUDA stream on ``device`` (0 is the legacy default stream)."""
    return int(torch.cuda.current_stream(torch.device("cuda", cuda_device_index(device))).cuda_stream)


def providers_for(device: torch.device) -> list:
    """onnxruntime providers for ``device``: on CUDA the CUDA provider with the device index and torch's
    current stream as its compute stream (then the CPU provider for what CUDA cannot run)."""
    device = torch.device(device)
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    options = {"device_id": str(cuda_device_index(device)),
               "user_compute_stream": str(current_stream_handle(device))}
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


def provider_name(provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


def create_session(path: str | os.PathLike, providers: Sequence = ("CPUExecutionProvider",), *,
                   threads: int | None = None, spinning: bool = False, low_memory: bool = False,
                   initializers: Mapping[str, object] | None = None):
    """The one onnxruntime session factory (the runtime's engines, export's validation).

    ``threads``: intra-op threads (``None``/0: onnxruntime's default). ``spinning``: worker threads spin
    while a run is in flight and stop when it returns (for sessions that alternate on the same cores);
    off, they never spin (two sessions on two cores otherwise fight). ``low_memory``: no pre-packed copies
    of the weights and no memory arena (validation of multi-GB graphs next to the torch model).
    ``initializers``: graph initializers overridden by name (weight hot-swap). onnxruntime logs errors
    only. A requested provider that onnxruntime silently replaced by the CPU raises
    :class:`BackendUnavailableError`."""
    ort = import_onnxruntime()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if initializers:
        # At ORT_ENABLE_ALL the CPU layout transformer (NCHWc) re-packs convolution weights from the
        # file's values, ignoring overridden initializers (measured: a swapped conv weight had no
        # effect); the extended level keeps overrides exact.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1")
        so.add_session_config_entry("session.force_spinning_stop", "1")
    else:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if low_memory:
        so.add_session_config_entry("session.disable_prepacking", "1")
        so.enable_cpu_mem_arena = False
    for name, value in (initializers or {}).items():
        so.add_initializer(name, value)
    providers = list(providers)
    sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    active = sess.get_providers()
    missing = [provider_name(p) for p in providers if provider_name(p) not in active]
    if missing:
        raise BackendUnavailableError(
            f"onnxruntime could not use {', '.join(missing)} for {Path(path).name} (active: {', '.join(active)})"
            + ("; install onnxruntime-gpu in place of onnxruntime for CUDA" if "CUDAExecutionProvider" in missing
               else "")
        )
    return sess


class OrtEngine:
    """One onnxruntime session. Inputs and outputs are bound to torch tensors by pointer (IO binding), so
    a call copies nothing. A requested provider that silently fell back to CPU raises
    :class:`BackendUnavailableError`.

    Weight hot-swap: :meth:`update_weights` re-creates the session with the named initializers overridden
    (``SessionOptions.add_initializer``). Each weight is located in the graph by its parameter name or, where
    the exporter renamed or transposed it, by its content (:func:`weight_map`); the exported, optimized and
    attention-fused graphs all keep the weights as initializers, so any of them can be swapped.
    """

    graph_capturable = False
    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, device: str | torch.device = "cpu",
                 providers: Sequence[str] | None = None, threads: int | None = None,
                 batch_range: tuple[int, int] | None = None):
        self.ort = import_onnxruntime()
        self.path = Path(onnx_path)
        self.device = torch.device(device)
        #: explicit providers, or None: :func:`providers_for` the device at each session creation
        self._given_providers = list(providers) if providers else None
        self.threads = threads
        self.batch_range = batch_range
        self._overrides: dict[str, object] = {}
        self._weight_map: dict[str, tuple] | None = None
        self._override_arrays: dict[str, np.ndarray] = {}
        self._stream: int | None = None  # torch's stream the CUDA provider was bound to
        self.session = self._create_session()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.dtypes = {a.name: _TORCH_OF_ORT.get(a.type) for a in (*self.session.get_inputs(), *self.session.get_outputs())}

    def tensor_dtype(self, name: str) -> torch.dtype | None:
        """The dtype the graph declares for an input or output (the runtime's buffers take it)."""
        return self.dtypes.get(name)

    def _create_session(self):
        providers = self._given_providers or providers_for(self.device)
        if self.device.type == "cuda":  # the CUDA provider computes on torch's stream of now
            self._stream = current_stream_handle(self.device)
        self.providers = providers
        # The runtime alternates two sessions. Their worker threads spin while a run is in flight (fast
        # hand-off between small ops) and stop spinning when it returns, so an idle session's threads do
        # not steal the cores from the other one. Measured on the 2-core CPU machine, tiny, one fusion +
        # one refinement call: 78 ms with this, 91 ms with spinning off, 110 ms with spinning left on.
        return create_session(self.path, providers, threads=self.threads or (os.cpu_count() or 1), spinning=True,
                              initializers=self._overrides)

    def _bind(self, binding, name: str, tensor: torch.Tensor, output: bool) -> None:
        if not tensor.is_contiguous():
            raise ValueError(f"{name}: buffers bound to onnxruntime must be contiguous")
        dev = "cuda" if tensor.device.type == "cuda" else "cpu"
        idx = tensor.device.index or 0 if tensor.device.type == "cuda" else 0
        fn = binding.bind_output if output else binding.bind_input
        fn(name, dev, idx, _ORT_TYPES[tensor.dtype], tuple(tensor.shape), tensor.data_ptr())

    def run(self, feeds: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        binding = self.session.io_binding()
        for name in self.input_names:
            self._bind(binding, name, feeds[name], output=False)
        for name in self.output_names:
            self._bind(binding, name, outputs[name], output=True)
        if self.device.type == "cuda":
            current = current_stream_handle(self.device)
            if current != self._stream or current == 0:
                # The session computes on the stream it was created with; when torch now queues on another
                # one (or on the legacy default stream, which a provider option may not name), wait for
                # torch's queued copies before onnxruntime reads the inputs.
                torch.cuda.current_stream(torch.device("cuda", cuda_device_index(self.device))).synchronize()
        self.session.run_with_iobinding(binding)

    needs_base_values = True

    def update_weights(self, named_tensors: Mapping[str, torch.Tensor],
                       base: Mapping[str, torch.Tensor] | None = None) -> None:
        if self._weight_map is None:
            self._weight_map = weight_map(self.path, base)
        for init_name, arr in graph_weights(self._weight_map, named_tensors):
            self._override_arrays[init_name] = arr  # OrtValues reference this memory: keep it alive
            self._overrides[init_name] = self.ort.OrtValue.ortvalue_from_numpy(arr)
        self.session = self._create_session()
        logger.info("onnxruntime session %s re-created with %d overridden weights", self.path.name,
                    len(self._overrides))


def weight_map(onnx_path: Path, base: Mapping[str, torch.Tensor] | None) -> dict[str, tuple[str, bool, np.dtype, tuple]]:
    """Locate each named base weight among the initializers a graph's nodes actually use: by name when the
    exporter kept it, else by content, flattened (exporters store linear weights transposed, and norm
    scales reshaped, under generated names). Content is compared in the initializer's own dtype: an fp16
    graph holds the float32 base values rounded to float16 (its norms stay float32), so each base value is
    rounded to every float dtype the graph holds before matching. Returns key -> (initializer, transposed,
    dtype, shape).

    Every base weight must be found: one that is not (the graph was exported from other weights, or an
    exporter folded it into another constant) raises :class:`~profusion_rt.core.errors.EngineError` rather than
    being skipped silently, and so does a content match shared by several initializers."""
    import onnx
    from onnx import numpy_helper

    if base is None:
        raise ValueError("locating the weights of a graph needs the base values (the first swap passes them)")
    model = onnx.load(str(onnx_path))
    used = {name for node in model.graph.node for name in node.input}
    by_name: dict[str, np.ndarray] = {}
    by_content: dict[tuple, list[str]] = {}
    for init in model.graph.initializer:
        if init.name not in used:
            continue
        arr = numpy_helper.to_array(init)
        by_name[init.name] = arr
        if arr.dtype.kind == "f" and arr.size > 1:
            by_content.setdefault(_content_key(arr), []).append(init.name)
    float_dtypes = sorted({np.dtype(k[0]) for k in by_content}, key=str)
    out: dict[str, tuple[str, bool, np.dtype, tuple]] = {}
    unresolved, missing = [], []
    for key, value in base.items():
        ref = value.detach().float().cpu().numpy()
        arr = by_name.get(key)
        if arr is not None and arr.size == ref.size:
            out[key] = (key, False, arr.dtype, arr.shape)
            continue
        found = None
        for transposed, cand in ((False, ref), (True, ref.T if ref.ndim == 2 else None)):
            if cand is None:
                continue
            for dtype in float_dtypes:
                names = by_content.get(_content_key(np.ascontiguousarray(cand).astype(dtype)))
                if names:
                    found = (names, transposed)
                    break
            if found:
                break
        if found is None:
            missing.append(key)
            continue
        names, transposed = found
        if len(names) > 1:
            unresolved.append(key)
        out[key] = (names[0], transposed, by_name[names[0]].dtype, by_name[names[0]].shape)
    name = Path(onnx_path).name
    if missing:
        raise EngineError(
            f"{len(missing)} of {len(base)} weights to swap were not found in {name} (e.g. {missing[0]}): the graph "
            "was exported from other weights, or stores them folded; re-export it from the base model")
    if unresolved:
        raise EngineError(
            f"{len(unresolved)} weights of {name} share their values with other initializers "
            f"(e.g. {unresolved[0]}), so they cannot be swapped in place; rebuild the engine from the new weights")
    logger.info("%s: %d of %d swappable weights located", name, len(out), len(base))
    return out


def graph_weights(mapping: Mapping[str, tuple], named_tensors: Mapping[str, torch.Tensor]):
    """(initializer name, array in the graph's layout and dtype) for each named tensor; a tensor the map does
    not hold raises :class:`~profusion_rt.core.errors.EngineError` (never skipped)."""

    for key, value in named_tensors.items():
        target = mapping.get(key)
        if target is None:
            raise EngineError(f"weight {key} was not located in the graph when its weights were mapped; "
                              "re-create the runtime")
        name, transposed, dtype, shape = target
        arr = value.detach().float().cpu().numpy()
        yield name, np.ascontiguousarray(arr.T if transposed else arr).astype(dtype, copy=False).reshape(shape)


def _content_key(arr: np.ndarray) -> tuple:
    """(dtype, size, digest of the bytes): equal keys mean bit-identical values in the same dtype."""
    import hashlib

    return arr.dtype.str, arr.size, hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest()
