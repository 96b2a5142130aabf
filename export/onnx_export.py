"""torch module -> ONNX file, for one graph spec.

Two exporters, both at opset >= 18 (the dynamo exporter's opset-17 output is rejected by onnxruntime):

* ``"dynamo"`` (default, torch's default exporter): ``torch.onnx.export(..., dynamo=True)`` with the
  batch axis as a ``torch.export.Dim``. About 3-4x slower than the legacy one on the tiny graphs.
* ``"legacy"``: the TorchScript exporter (``dynamo=False``, deprecated by torch but still shipped), with
  ``dynamic_axes``. Fast; the tests use it for most graphs.

After export the file is checked against the spec (input/output names, element types, ranks, and for a
dynamic export that every batch axis is one shared symbol ``B`` — the exporter silently freezes it when
the model does shape-dependent Python on the batch), stamped with metadata, and saved with external data
(``<file>.data``) when it is over 2 GB. Files are staged and renamed into place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from profusion_rt.artifacts.specs import GraphSpec
from profusion_rt.artifacts.store import EXTERNAL_DATA_THRESHOLD
from profusion_rt.core.errors import InvalidParameterError, ProFusionError
from profusion_rt.core.fsio import file_mode, move_into_place, staging_dir

logger = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "legacy")
MIN_OPSET = 18

_FILE_MODE = file_mode()
_ONNX_TYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 9: "bool"}


class ExportError(ProFusionError):
    """A graph could not be exported, or the exported file does not match its spec."""


@dataclass
class ExportInfo:
    path: Path
    files: list[str]
    seconds: float
    bytes: int
    external_data: bool


#: graphs the TorchScript exporter cannot export, and why; they go through the dynamo exporter instead
LEGACY_UNSUPPORTED = {
    "image_encoder": "antialiased bicubic resize (aten::_upsample_bicubic2d_aa) has no TorchScript symbolic",
}


def resolve_exporter(graph: str, exporter: str) -> str:
    """The exporter actually used for ``graph`` (``legacy`` falls back to ``dynamo`` where it cannot)."""
    if exporter == "legacy" and graph in LEGACY_UNSUPPORTED:
        return "dynamo"
    return exporter


def check_opset(opset: int) -> int:
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise InvalidParameterError(
            f"opset must be an integer >= {MIN_OPSET} (opset 17 output of torch's exporter is rejected by "
            f"onnxruntime), got {opset!r}")
    return opset


def export_onnx(spec: GraphSpec, module: torch.nn.Module, example: Mapping[str, torch.Tensor], path: Path, *,
                opset: int = 18, exporter: str = "dynamo", dynamic_batch: bool = False,
                metadata: Mapping[str, str] | None = None) -> ExportInfo:
    """Export ``module`` (inputs in ``spec.input_names`` order) to ``path`` (plus ``path.data`` when the
    weights are over 2 GB). ``example`` are inputs of the exported dtypes at the export batch."""
    check_opset(opset)
    if exporter not in EXPORTERS:
        raise InvalidParameterError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if resolve_exporter(spec.name, exporter) != exporter:
        logger.info("%s: %s; using the dynamo exporter", spec.name, LEGACY_UNSUPPORTED[spec.name])
        exporter = resolve_exporter(spec.name, exporter)
    path = Path(path)
    args = tuple(example[name] for name in spec.input_names)
    start = time.perf_counter()
    with staging_dir(path.parent) as tmp:
        raw = tmp / "raw" / "model.onnx"
        raw.parent.mkdir()
        with torch.no_grad(), _quiet():
            try:
                if exporter == "legacy":
                    _export_legacy(spec, module, args, raw, opset, dynamic_batch)
                else:
                    _export_dynamo(spec, module, args, raw, opset, dynamic_batch)
            except ProFusionError:
                raise
            except Exception as exc:  # exporter failures are many and untyped
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ExportError(f"{spec.name}: {exporter} export failed: {type(exc).__name__}: {first}") from exc
        model, data_file = _load_exported(raw)
        _conform(spec, model, example, dynamic_batch)
        model.producer_name = "profusion-rt"
        for key, value in {"graph": spec.name, "spec_hash": spec.spec_hash(), "exporter": exporter,
                           **(metadata or {})}.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = str(key), str(value)
        if data_file is not None:
            # large model: keep the exporter's single data file as is (no second copy of the weights in memory)
            files, size, external = _save_keeping_data(model, data_file, tmp / "final", path.name)
        else:
            files, size, external = save_model(model, tmp / "final", path.name)
        del model
        move_into_place({tmp / "final" / f: path.parent / f for f in sorted(files, key=lambda f: f == path.name)})
    seconds = time.perf_counter() - start
    logger.info("%s: exported with %s in %.1f s (%.1f MB%s)", spec.name, exporter, seconds, size / 1e6,
                ", external data" if external else "")
    return ExportInfo(path, files, seconds, size, external)


def _external_locations(model: Any) -> dict[str, int]:
    """location -> bytes referenced, over the initializers stored outside the model file."""
    out: dict[str, int] = {}
    for init in model.graph.initializer:
        if init.data_location == 1:  # TensorProto.EXTERNAL
            info = {e.key: e.value for e in init.external_data}
            out[info["location"]] = out.get(info["location"], 0) + int(info.get("length", 0))
    return out


def _load_exported(raw: Path) -> tuple[Any, Path | None]:
    """Load the exporter's file. Returns (model, data file) with the weights left on disk when they are
    over 2 GB and already in one external file; else (model with every weight loaded, None)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    model = onnx.load(str(raw), load_external_data=False)
    locations = _external_locations(model)
    if len(locations) == 1 and sum(locations.values()) >= EXTERNAL_DATA_THRESHOLD:
        return model, raw.parent / next(iter(locations))
    if locations:
        load_external_data_for_model(model, str(raw.parent))
    return model, None


def _save_keeping_data(model: Any, data_file: Path, folder: Path, name: str) -> tuple[list[str], int, bool]:
    """Save the model file with its external references renamed to ``<name>.data`` and move the data file."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    new_location = f"{name}.data"
    for init in model.graph.initializer:
        if init.data_location == 1:
            for e in init.external_data:
                if e.key == "location":
                    e.value = new_location
    os.replace(data_file, folder / new_location)
    onnx.save_model(model, str(folder / name))
    for f in (name, new_location):
        os.chmod(folder / f, _FILE_MODE)
    files = [name, new_location]
    return files, sum((folder / f).stat().st_size for f in files), True


def model_weight_bytes(model: Any) -> int:
    """Bytes of all initializers and constant tensors (what decides external data)."""
    import numpy as np
    from onnx import helper

    total = 0
    for init in model.graph.initializer:
        if init.HasField("raw_data"):
            total += len(init.raw_data)
        else:
            n = int(np.prod(init.dims)) if len(init.dims) else 1
            total += n * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
    return total


def save_model(model: Any, folder: Path, name: str) -> tuple[list[str], int, bool]:
    """Save ``model`` as ``folder/name``; weights to ``folder/name.data`` when over 2 GB (protobuf's limit).
    Returns (file names, total bytes, external?)."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    weights = model_weight_bytes(model)
    external = weights >= EXTERNAL_DATA_THRESHOLD
    target = folder / name
    if external:
        onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{name}.data", size_threshold=1024)
        files = [name, f"{name}.data"]
    else:
        onnx.save_model(model, str(target))
        files = [name]
    for f in files:  # onnx writes external data with mode 0600; give every file the same, umask-based mode
        os.chmod(folder / f, _FILE_MODE)
    return files, sum((folder / f).stat().st_size for f in files), external


@contextlib.contextmanager
def _quiet():
    """The exporters warn a lot (deprecations, tracer warnings about Python control flow in diffusers that
    is constant for our shapes) and print progress; keep that out of the user's terminal unless debugging."""
    with warnings.catch_warnings():
        if not logger.isEnabledFor(logging.DEBUG):
            warnings.simplefilter("ignore")
        if logger.isEnabledFor(logging.DEBUG):
            yield
            return
        onnx_logger = logging.getLogger("torch.onnx")
        level = onnx_logger.level
        onnx_logger.setLevel(logging.ERROR)
        try:
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                yield
        finally:
            onnx_logger.setLevel(level)


def _export_legacy(spec, module, args, path, opset, dynamic_batch):
    axes = {name: {int(a): s for a, s in ax.items()} for name, ax in spec.dynamic_axes.items()} if dynamic_batch else None
    torch.onnx.export(module, args, str(path), input_names=list(spec.input_names),
                      output_names=list(spec.output_names), opset_version=opset, dynamo=False,
                      dynamic_axes=axes, do_constant_folding=True)


def _export_dynamo(spec, module, args, path, opset, dynamic_batch):
    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("B", min=1, max=spec.max_batch)
        axes = spec.batch_axes()
        shapes = tuple({axes[name]: batch} if name in axes else None for name in spec.input_names)
    program = torch.onnx.export(module, args, None, input_names=list(spec.input_names),
                                output_names=list(spec.output_names), opset_version=opset, dynamo=True,
                                dynamic_shapes=shapes, optimize=True, verbose=False)
    program.save(str(path), external_data=True)


def _dims(value_info) -> list:
    out = []
    for d in value_info.type.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?"))
    return out


def _conform(spec: GraphSpec, model, example: Mapping[str, torch.Tensor], dynamic_batch: bool) -> None:
    """Check the exported I/O against the spec; name the batch symbol ``B`` everywhere."""
    graph_inputs = [i for i in model.graph.input]
    names_in = [i.name for i in graph_inputs]
    names_out = [o.name for o in model.graph.output]
    if names_in != list(spec.input_names):
        raise ExportError(f"{spec.name}: exported inputs {names_in} differ from the spec's {list(spec.input_names)}")
    if names_out != list(spec.output_names):
        raise ExportError(f"{spec.name}: exported outputs {names_out} differ from the spec's {list(spec.output_names)}")
    axes = spec.batch_axes()
    symbols = set()
    for vi in (*model.graph.input, *model.graph.output):
        dims = _dims(vi)
        if vi.name in example:
            want_dtype = str(example[vi.name].dtype).removeprefix("torch.")
            got = _ONNX_TYPES.get(vi.type.tensor_type.elem_type, str(vi.type.tensor_type.elem_type))
            if got != want_dtype:
                raise ExportError(f"{spec.name}: input {vi.name} is {got} in the ONNX file, expected {want_dtype}")
            if len(dims) != example[vi.name].dim():
                raise ExportError(f"{spec.name}: input {vi.name} has rank {len(dims)}, expected {example[vi.name].dim()}")
        if vi.name in axes:
            axis = axes[vi.name]
            d = vi.type.tensor_type.shape.dim[axis]
            if dynamic_batch:
                if d.HasField("dim_value") or not d.dim_param:
                    raise ExportError(
                        f"{spec.name}: the batch axis of {vi.name} was frozen to {d.dim_value} by the exporter "
                        "(shape-dependent Python on the batch, e.g. tensor.chunk); it must stay symbolic")
                symbols.add(d.dim_param)
    if dynamic_batch and len(symbols) > 1:
        # Legal but unhelpful: one batch symbol per input. The spec says they are all B.
        logger.debug("%s: batch symbols %s renamed to B", spec.name, sorted(symbols))
    if dynamic_batch:
        _rename_dim_params(model, symbols, "B")


def _rename_dim_params(model, old: set[str], new: str) -> None:
    def fix(vi):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in old:
                d.dim_param = new

    for vi in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        fix(vi)
