"""One engine protocol for every backend, and the aligned buffers engines are fed with.

An engine runs one graph on named tensors. ``run(feeds, outputs)`` reads the input tensors and writes the
graph's outputs into the given, preallocated output tensors (static buffers: nothing is allocated per
call by the caller, and on CUDA nothing synchronises with the host). Backends are small classes; the
runtime never branches on backend names.

Buffers: TensorRT requires every tensor address to be aligned to :data:`ALIGNMENT` (256) bytes, and takes
each tensor in the dtype the engine declares. The runtime therefore allocates its static buffers with
:func:`aligned_empty` / :func:`aligned_rows` (every per-step row starts on a 256-byte boundary) and asks each
engine for a tensor's dtype (:meth:`Engine.tensor_dtype`).
"""

from __future__ import annotations

import math
from typing import Mapping, Protocol, Sequence, runtime_checkable

import torch

#: the address alignment (bytes) TensorRT requires of every I/O tensor; CUDA allocations are 512-aligned
ALIGNMENT = 256


@runtime_checkable
class Engine(Protocol):
    name: str
    #: whether a CUDA graph may capture ``run`` (kernels only, no host synchronisation)
    graph_capturable: bool
    #: (min, max) batch the engine accepts, or None for any
    batch_range: tuple[int, int] | None

    def run(self, feeds: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        """Execute once; results are written into ``outputs`` (same names as the graph's outputs)."""
        ...

    def update_weights(self, named_tensors: Mapping[str, torch.Tensor],
                       base: Mapping[str, torch.Tensor] | None = None) -> None:
        """Swap in new weights (a customization delta) without rebuilding the engine. Names are the
        pipeline's (``promptnet.<param>``, ``unet.<param>``); ``base`` holds the values before the swap for
        engines that locate weights by content (``needs_base_values``)."""
        ...

    # Optional: ``tensor_dtype(name) -> torch.dtype | None``: the dtype the engine reads or writes for one
    # of its I/O tensors (None: whatever the runtime uses). ``weights_in_place = True``: the engine computes
    # with the pipeline's own modules, so a delta applied to them in place changes nothing it captured.


def engine_tensor_dtype(engine: Engine, name: str) -> torch.dtype | None:
    """``engine.tensor_dtype(name)`` where the engine declares dtypes, else None."""
    fn = getattr(engine, "tensor_dtype", None)
    return None if fn is None else fn(name)


def aligned_empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str,
                  alignment: int = ALIGNMENT) -> torch.Tensor:
    """An uninitialised contiguous tensor whose first element is ``alignment``-byte aligned (on any device:
    CPU allocations are only 64-byte aligned)."""
    return aligned_rows(1, tuple(shape), dtype, device, alignment)[0]


def aligned_rows(rows: int, row_shape: Sequence[int], dtype: torch.dtype, device: torch.device | str,
                 alignment: int = ALIGNMENT) -> torch.Tensor:
    """A ``(rows, *row_shape)`` tensor whose every row is contiguous and starts on an ``alignment``-byte
    boundary (rows are padded). ``t[i]`` is then a valid TensorRT tensor address for every ``i``."""
    row_shape = tuple(int(d) for d in row_shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if alignment % itemsize:
        raise ValueError(f"alignment {alignment} is not a multiple of the {dtype} item size")
    numel = math.prod(row_shape)
    per = alignment // itemsize
    stride = max(per, -(-numel // per) * per)  # elements per padded row, a multiple of the alignment
    raw = torch.empty(rows * stride * itemsize + alignment, dtype=torch.uint8, device=device)
    offset = (-raw.data_ptr()) % alignment
    base = raw[offset:offset + rows * stride * itemsize].view(dtype)
    inner = [1] * len(row_shape)
    for i in range(len(row_shape) - 2, -1, -1):
        inner[i] = inner[i + 1] * row_shape[i + 1]
    return base.as_strided((rows, *row_shape), (stride, *inner))
