"""ONNX -> optimized ONNX with polygraphy's Python API: constant folding, then shape inference.

The Python API is used rather than ``polygraphy surgeon sanitize``: the CLI cannot save models over 2 GB
(protobuf limit), while here the folded model is saved with external data when it needs it.
onnxruntime's transformers optimizer is not used: for ``model_type="unet"`` it inserts GPU-only ops.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from profusion_rt.artifacts.store import move_into_place, staging_dir

from .onnx_export import save_model

logger = logging.getLogger(__name__)

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


def polygraphy_quiet() -> None:
    """polygraphy logs to stdout at INFO; keep it to warnings unless debugging."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.VERBOSE if logger.isEnabledFor(logging.DEBUG) else G_LOGGER.WARNING


def optimize_onnx(src: Path, dst: Path, batch_axes: dict[str, int] | None = None) -> OptimizeInfo:
    """Shape inference, constant folding, shape inference again; saved as ``dst`` (external data over
    2 GB). ``batch_axes`` (name -> axis, for a symbolic batch): shape inference may name an output's batch
    dimension by an expression such as ``floor(1.0*B)``; it is set back to ``B``.

    Shape inference always runs on the model *without its weights* (initializers keep their dims, the
    bytes stay on disk), so a 3.5 GB UNet is not serialized to a temporary file for every folding pass as
    polygraphy does for models over 2 GB; folding itself needs the weights and gets them.
    """
    import onnx
    from onnx.external_data_helper import load_external_data_for_model
    from polygraphy.backend.onnx import fold_constants, infer_shapes

    polygraphy_quiet()
    with contextlib.suppress(ImportError):  # polygraphy folds with onnxruntime, which warns on stderr
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    before = len(model.graph.node)
    metadata = {p.key: p.value for p in model.metadata_props}
    producer = model.producer_name
    model = infer_shapes(model, error_ok=True)
    load_external_data_for_model(model, str(src.parent))
    model = fold_constants(model, do_shape_inference=False, size_threshold=FOLD_SIZE_THRESHOLD, error_ok=True)
    after = len(model.graph.node)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(dst.parent) as tmp:
        files, size, external = save_model(model, tmp, dst.name)
        del model
        # final shape inference on the saved model file alone (weights not loaded)
        model = onnx.load(str(tmp / dst.name), load_external_data=False)
        model = infer_shapes(model, error_ok=True)
        _fix_batch_dims(model, batch_axes)
        # graphsurgeon drops the model's metadata: carry it over, and say what was done
        model.producer_name = producer
        del model.metadata_props[:]
        for key, value in {**metadata, "optimized": "polygraphy infer_shapes + fold_constants + infer_shapes"}.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save_model(model, str(tmp / dst.name))
        size = sum((tmp / f).stat().st_size for f in files)
        move_into_place({tmp / f: dst.parent / f for f in sorted(files, key=lambda f: f == dst.name)})
    seconds = time.perf_counter() - start
    logger.info("optimized %s: %d -> %d nodes in %.1f s", dst, before, after, seconds)
    return OptimizeInfo(dst, files, seconds, size, external, before, after)


def _fix_batch_dims(model, batch_axes: dict[str, int] | None) -> None:
    for vi in (*model.graph.input, *model.graph.output):
        axis = (batch_axes or {}).get(vi.name)
        if axis is not None:
            d = vi.type.tensor_type.shape.dim[axis]
            if not d.HasField("dim_value"):
                d.dim_param = "B"
