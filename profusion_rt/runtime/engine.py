"""One engine protocol for every backend.

An engine runs one graph on named tensors. ``run(feeds, outputs)`` reads the input tensors and writes the
graph's outputs into the given, preallocated output tensors (static buffers: nothing is allocated per
call by the caller, and on CUDA nothing synchronises with the host). Backends are small classes; the
runtime never branches on backend names.
"""

from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

import torch


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
