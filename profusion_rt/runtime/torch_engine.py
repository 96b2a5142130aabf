"""TorchEngine: a fused stage module run eagerly or through ``torch.compile``."""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)


class TorchEngine:
    """Runs ``module(**feeds)`` and copies the single output into the static output buffer.

    ``compile=True`` wraps the module with ``torch.compile`` (``dynamic=False``: one graph per shape;
    per-step scalars are tensors, so steps never recompile). Weights are the module's own parameters,
    so :meth:`update_weights` is an in-place copy that keeps compiled code and captured CUDA graphs valid.
    """

    graph_capturable = True
    batch_range = None  # any batch
    #: computes with the pipeline's own modules: a delta applied to them in place is seen at once, and
    #: captured CUDA graphs stay valid
    weights_in_place = True

    def __init__(self, module: nn.Module, input_names: Sequence[str], output_name: str = "x_out",
                 compile: bool = False, compile_mode: str | None = None, name: str | None = None):
        self.module = module.eval()
        self.input_names = tuple(input_names)
        self.output_name = output_name
        self.compiled = compile
        self.name = name or ("torch-compile" if compile else "torch")
        self._fn = torch.compile(self.module, dynamic=False, mode=compile_mode) if compile else self.module

    @torch.no_grad()
    def run(self, feeds: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        out = self._fn(*(feeds[n] for n in self.input_names))
        outputs[self.output_name].copy_(out)

    def update_weights(self, named_tensors: Mapping[str, torch.Tensor], base=None) -> None:
        """Nothing to do when the runtime already updated the shared modules in place; otherwise copy the
        named values (``"<module>.<parameter>"`` names of the stage module) into the parameters."""
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for key, value in named_tensors.items():
                target = params.get(key)
                if target is not None and target.data_ptr() != value.data_ptr():
                    target.copy_(value)
