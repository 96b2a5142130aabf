"""OrtEngine: an ONNX graph run by onnxruntime with IO binding on the runtime's static buffers."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from ..errors import BackendUnavailableError

logger = logging.getLogger(__name__)

_ORT_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
              torch.int32: np.int32, torch.bool: np.bool_}


def import_onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise BackendUnavailableError(
            "onnxruntime is not installed (pip install 'profusion-rt[onnx]', or onnxruntime-gpu for CUDA)"
        ) from exc
    return ort


def providers_for(device: torch.device) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]


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
        self.providers = list(providers or providers_for(self.device))
        self.threads = threads
        self.batch_range = batch_range
        self._overrides: dict[str, object] = {}
        self._weight_map: dict[str, tuple] | None = None
        self._override_arrays: dict[str, np.ndarray] = {}
        self.session = self._create_session()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _session_options(self):
        so = self.ort.SessionOptions()
        so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The runtime alternates two sessions. Their worker threads spin while a run is in flight (fast
        # hand-off between small ops) and stop spinning when it returns, so an idle session's threads do
        # not steal the cores from the other one. Measured on the 2-core CPU machine, tiny, one fusion +
        # one refinement call: 78 ms with this, 91 ms with spinning off, 110 ms with spinning left on.
        so.add_session_config_entry("session.intra_op.allow_spinning", "1")
        so.add_session_config_entry("session.force_spinning_stop", "1")
        so.intra_op_num_threads = self.threads or (os.cpu_count() or 1)
        so.log_severity_level = 3
        if self._overrides:
            # At ORT_ENABLE_ALL the CPU layout transformer (NCHWc) re-packs convolution weights from the
            # file's values, ignoring overridden initializers (measured: a swapped conv weight had no
            # effect); the extended level keeps overrides exact.
            so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        for name, value in self._overrides.items():
            so.add_initializer(name, value)
        return so

    def _create_session(self):
        sess = self.ort.InferenceSession(str(self.path), sess_options=self._session_options(),
                                         providers=self.providers)
        active = sess.get_providers()
        if self.providers[0] not in active:
            raise BackendUnavailableError(
                f"onnxruntime could not use {self.providers[0]} for {self.path.name} (active: {', '.join(active)});"
                " install onnxruntime-gpu in place of onnxruntime for CUDA"
            )
        return sess

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
    scales reshaped, under generated names). Returns key -> (initializer, transposed, dtype, shape).
    Weights the graph does not use are left out; a content match shared by several initializers cannot
    be resolved and raises."""
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
            by_content.setdefault(_content_key(arr.astype(np.float32)), []).append(init.name)
    out: dict[str, tuple[str, bool, np.dtype, tuple]] = {}
    unresolved = []
    for key, value in base.items():
        ref = value.detach().float().cpu().numpy()
        arr = by_name.get(key)
        if arr is not None and arr.size == ref.size:
            out[key] = (key, False, arr.dtype, arr.shape)
            continue
        for transposed, cand in ((False, ref), (True, ref.T if ref.ndim == 2 else None)):
            if cand is None:
                continue
            names = by_content.get(_content_key(np.ascontiguousarray(cand)))
            if names:
                if len(names) > 1:
                    unresolved.append(key)
                out[key] = (names[0], transposed, by_name[names[0]].dtype, by_name[names[0]].shape)
                break
    if unresolved:
        from ..errors import BackendUnavailableError

        raise BackendUnavailableError(
            f"{len(unresolved)} weights of {Path(onnx_path).name} share their values with other initializers "
            f"(e.g. {unresolved[0]}), so they cannot be swapped in place; rebuild the engine from the new weights")
    logger.info("%s: %d of %d swappable weights located", Path(onnx_path).name, len(out), len(base))
    return out


def graph_weights(mapping: Mapping[str, tuple], named_tensors: Mapping[str, torch.Tensor]):
    """(initializer name, array in the graph's layout and dtype) for each named tensor the graph uses."""
    for key, value in named_tensors.items():
        target = mapping.get(key)
        if target is None:
            continue
        name, transposed, dtype, shape = target
        arr = value.detach().float().cpu().numpy()
        yield name, np.ascontiguousarray(arr.T if transposed else arr).astype(dtype, copy=False).reshape(shape)


def _content_key(arr: np.ndarray) -> tuple:
    import hashlib

    return arr.size, hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest()
