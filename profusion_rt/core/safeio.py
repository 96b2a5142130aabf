"""safetensors files written atomically, read with typed errors (training checkpoints, subject deltas).

Files are written with :func:`profusion_rt.core.fsio.atomic_write`: a reader (or a crash, or Ctrl-C) never
sees a half-written file, and an existing file of the same name stays intact until the new one is complete.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from profusion_rt.core.errors import ModelLoadError
from profusion_rt.core.fsio import atomic_write

logger = logging.getLogger(__name__)


def save_atomic(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write ``tensors`` (moved to the CPU, made contiguous) and string ``metadata`` to ``path`` atomically."""
    from safetensors.torch import save_file

    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    target = atomic_write(path, lambda tmp: save_file(data, str(tmp), metadata=metadata))
    logger.debug("wrote %s (%d tensors)", target, len(data))
    return target


def _open(path: str | os.PathLike, error: type[ModelLoadError], what: str, with_tensors: bool):
    from safetensors import safe_open

    source = Path(path)
    if not source.is_file():
        raise error(f"{what} {source} does not exist" if not source.exists() else f"{what} {source} is not a file")
    try:
        with safe_open(str(source), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()} if with_tensors else {}
    except Exception as exc:  # noqa: BLE001 - any decoder failure means a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"cannot read {what} {source}: {first}") from exc
    return tensors, metadata


def read(path: str | os.PathLike, error: type[ModelLoadError] = ModelLoadError,
         what: str = "file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; ``error`` (one line, naming the file) if unreadable."""
    return _open(path, error, what, with_tensors=True)


def read_metadata(path: str | os.PathLike, error: type[ModelLoadError] = ModelLoadError,
                  what: str = "file") -> dict[str, str]:
    """The metadata of a safetensors file, without reading its tensors."""
    return _open(path, error, what, with_tensors=False)[1]


def json_field(metadata: dict[str, str], key: str, source: Path, error: type[ModelLoadError]) -> Any:
    try:
        return json.loads(metadata[key])
    except (KeyError, ValueError) as exc:
        raise error(f"{source} has no valid {key!r} metadata") from exc
