"""Subject deltas, the write side: extract the tensors a single-image customization changed and save them.

The format, the read side (load, fit check, apply in place) and the base fingerprint are
:mod:`profusion_rt.models.delta` (the runtime and the server read deltas; training writes them).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from profusion_rt import __version__
from profusion_rt.core.dtypes import PRECISION_DTYPES
from profusion_rt.core.errors import DeltaError
from profusion_rt.core.safeio import save_atomic
from profusion_rt.models.delta import (
    FORMAT,
    FORMAT_VERSION,
    Delta,
    delta_parameters,
)

logger = logging.getLogger(__name__)

__all__ = ["extract_delta", "save_delta"]


def extract_delta(pipe, base_fingerprint: str, dtype: torch.dtype | None = None) -> Delta:
    """A delta holding (copies of) the pipeline's current values of the delta tensors."""
    tensors = {k: p.detach().to("cpu", dtype=dtype or p.dtype, copy=True) for k, p in delta_parameters(pipe).items()}
    return Delta(tensors, base_fingerprint)


def save_delta(path: str | os.PathLike, pipe, base_fingerprint: str, dtype: torch.dtype | None = None,
               training: dict[str, Any] | None = None) -> Path:
    """Write ``pipe``'s delta tensors to ``path`` (atomically). ``base_fingerprint``: :func:`base_fingerprint`
    of the model *before* customization. ``dtype``: storage dtype (default: the parameters' own)."""

    delta = extract_delta(pipe, base_fingerprint, dtype)
    if delta.dtype not in PRECISION_DTYPES.values():
        raise DeltaError(f"a delta is stored as float32, float16 or bfloat16, not {delta.dtype}")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_fingerprint": base_fingerprint,
        "dtype": str(delta.dtype).removeprefix("torch."),
        "tensor_count": str(len(delta.tensors)),
        "created_by": f"profusion-rt {__version__}",
    }
    if training:
        metadata["training"] = json.dumps(training, sort_keys=True, default=str)
    target = save_atomic(path, delta.tensors, metadata)
    logger.info("wrote delta %s: %d tensors, %.1f MB", target, len(delta.tensors), delta.nbytes() / 1e6)
    return target
