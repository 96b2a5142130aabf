"""ONNX -> optimized ONNX with polygraphy's Python API: constant folding, then shape inference.

The Python API is used rather than ``polygraphy surgeon sanitize``: the CLI cannot save models over 2 GB
(protobuf limit), while here the folded model is saved with external data when it needs it.
onnxruntime's transformers optimizer is not used: for ``model_type="unet"`` it inserts GPU-only ops.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from profusion_rt.core.fsio import move_into_place, staging_dir

from profusion_rt.export.onnx_export import save_model

logger = logging.getLogger(__name__)

#: Initializers of this size or more are left out of constant folding (and of graphsurgeon's copies):
#: folding that depends on a weight was already done by the exporter.
HIDE_MIN_BYTES = 1024 * 1024
#: Folding never materialises a tensor larger than this (Expand/Tile of constants would bloat the file).
FOLD_SIZE_THRESHOLD = 64 * 1024 * 1024


@dataclass
class OptimizeInfo:
    path: Path
    files: list[str]
    seconds: float
    bytes: int
    external_data: bool
    nodes_before: int
    nodes_after: int
    #: external data files of the source model that the optimized model reads (shared, not copied)
    shared_data: list[str] = field(default_factory=list)


def polygraphy_quiet() -> None:
    """polygraphy logs to stdout at INFO; keep it to warnings unless debugging (and drop its one-time
    advice to install ``colored`` printed on first import)."""
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.VERBOSE if logger.isEnabledFor(logging.DEBUG) else G_LOGGER.WARNING


def optimize_onnx(src: Path, dst: Path, batch_axes: dict[str, int] | None = None) -> OptimizeInfo:
    """Shape inference, constant folding, shape inference again; saved as ``dst``.

    ``batch_axes`` (name -> axis, for a symbolic batch): shape inference may name an output's batch
    dimension by an expression such as ``floor(1.0*B)``; it is set back to ``B``.

    Memory and time: the weights take no part. Initializers in external data (models over 2 GB) and all
    of 1 MiB or more are turned into graph inputs for the folding, so nothing that depends on a weight is
    folded (the exporters already folded weight transposes and casts) and graphsurgeon never copies them,
    then put back. External ones are never even loaded: they keep pointing at the source's data file,
    which the optimized model shares (``dst`` must be in the same folder). Folding with the weights
    loaded cost two to three copies of them: the sd2-base fusion stage (6.3 GB of weights) ran out of
    24 GB that way, and the 1.7 GB float16 UNet took 65 s. Shape inference runs on the model without
    external weight bytes, so polygraphy never serializes a multi-GB model to a temporary file.
    """
    import onnx

    polygraphy_quiet()
    from polygraphy.backend.onnx import fold_constants, infer_shapes

    with contextlib.suppress(ImportError):  # polygraphy folds with onnxruntime, which warns on stderr
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    before = len(model.graph.node)
    metadata = {p.key: p.value for p in model.metadata_props}
    producer = model.producer_name
    shared = sorted(external_locations(model))
    if shared and src.resolve().parent != dst.resolve().parent:
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, str(src.parent))  # cannot share: fold with the weights loaded
        shared = []
    # weights out of the way first: shape inference and folding then work on a small model
    hidden = _hide_weights(model)
    model = infer_shapes(model, error_ok=True)
    model = fold_constants(model, size_threshold=FOLD_SIZE_THRESHOLD, error_ok=True)
    model = infer_shapes(model, error_ok=True)
    if hidden:
        _restore_weights(model, hidden)
        del hidden
    after = len(model.graph.node)
    _fix_batch_dims(model, batch_axes)
    # graphsurgeon drops the model's metadata: carry it over, and say what was done
    model.producer_name = producer
    del model.metadata_props[:]
    for key, value in {**metadata, "optimized": "polygraphy infer_shapes + fold_constants + infer_shapes"}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    dst.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(dst.parent) as tmp:
        if shared:
            onnx.save_model(model, str(tmp / dst.name))  # weights stay where they are
            files, external = [dst.name], True
            size = (tmp / dst.name).stat().st_size
        else:
            files, size, external = save_model(model, tmp, dst.name)
        del model
        move_into_place({tmp / f: dst.parent / f for f in sorted(files, key=lambda f: f == dst.name)})
    seconds = time.perf_counter() - start
    logger.info("optimized %s: %d -> %d nodes in %.1f s", dst, before, after, seconds)
    return OptimizeInfo(dst, files, seconds, size, external, before, after, shared)


def external_locations(model) -> set[str]:
    """The external data files the model's initializers point at."""
    locations = set()
    for init in model.graph.initializer:
        if init.data_location == 1:  # TensorProto.EXTERNAL
            locations.update(e.value for e in init.external_data if e.key == "location")
    return locations


def _hide_weights(model, min_bytes: int = HIDE_MIN_BYTES) -> dict[str, object]:
    """Move the initializers stored in external data, and those of ``min_bytes`` or more, to graph inputs;
    return them by name. ``pop`` hands over the tensors without copying their bytes."""
    from onnx import helper

    hidden = {}
    inits = model.graph.initializer
    for i in range(len(inits) - 1, -1, -1):
        t = inits[i]
        if t.data_location == 1 or len(t.raw_data) >= min_bytes:
            hidden[t.name] = inits.pop(i)
    for name, t in reversed(list(hidden.items())):
        model.graph.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    return hidden


def _restore_weights(model, hidden: dict[str, object]) -> None:
    """Undo :func:`_hide_weights` for the weights still used."""
    used = {i for node in model.graph.node for i in node.input}
    used |= {o.name for o in model.graph.output}
    inputs = [vi for vi in model.graph.input if vi.name not in hidden]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.graph.initializer.extend(t for name, t in hidden.items() if name in used)


def _fix_batch_dims(model, batch_axes: dict[str, int] | None) -> None:
    for vi in (*model.graph.input, *model.graph.output):
        axis = (batch_axes or {}).get(vi.name)
        if axis is not None:
            d = vi.type.tensor_type.shape.dim[axis]
            if not d.HasField("dim_value"):
                d.dim_param = "B"
