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
    """Fold constants (with shape inference between passes), run shape inference on the result, and save
    it as ``dst`` (external data over 2 GB). ``batch_axes`` (name -> axis, for a symbolic batch): shape
    inference may name an output's batch dimension by an expression such as ``floor(1.0*B)``; it is set
    back to ``B``."""
    import onnx
    from polygraphy.backend.onnx import fold_constants, infer_shapes

    polygraphy_quiet()
    with contextlib.suppress(ImportError):  # polygraphy folds with onnxruntime, which warns on stderr
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    start = time.perf_counter()
    model = onnx.load(str(src), load_external_data=True)
    before = len(model.graph.node)
    metadata = {p.key: p.value for p in model.metadata_props}
    producer = model.producer_name
    model = fold_constants(model, size_threshold=FOLD_SIZE_THRESHOLD, error_ok=True)
    model = infer_shapes(model, error_ok=True)
    after = len(model.graph.node)
    for vi in (*model.graph.input, *model.graph.output):
        axis = (batch_axes or {}).get(vi.name)
        if axis is not None:
            d = vi.type.tensor_type.shape.dim[axis]
            if not d.HasField("dim_value"):
                d.dim_param = "B"
    # graphsurgeon drops the model's metadata: carry it over, and say what was done
    model.producer_name = producer
    del model.metadata_props[:]
    for key, value in {**metadata, "optimized": "polygraphy fold_constants + infer_shapes"}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    dst = Path(dst)
    with staging_dir(dst.parent) as tmp:
        files, size, external = save_model(model, tmp, dst.name)
        del model
        move_into_place({tmp / f: dst.parent / f for f in sorted(files, key=lambda f: f == dst.name)})
    seconds = time.perf_counter() - start
    logger.info("optimized %s: %d -> %d nodes in %.1f s", dst, before, after, seconds)
    return OptimizeInfo(dst, files, seconds, size, external, before, after)
