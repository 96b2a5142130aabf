"""Validation of exported graphs: onnxruntime (CPU) against the PyTorch module on fresh random inputs.

For every output: NaN/Inf checks on both sides, then ``|onnx - torch| <= atol + rtol * |torch|``
elementwise with the spec's tolerance for the artifact's precision. Float16 artifacts get float16
inputs (rounded from float32 draws) and are compared with the float32 torch module run on the same
rounded values, so the check measures the float16 graph's own error.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from profusion_rt.artifacts.specs import GraphSpec, precision_dtype
from profusion_rt.core.dtypes import torch_dtype
from profusion_rt.core.errors import ProFusionError
from profusion_rt.runtime.ort_engine import create_session, import_onnxruntime

logger = logging.getLogger(__name__)


class ValidationError(ProFusionError):
    """An exported graph's output differs from PyTorch beyond the spec's tolerance, or is not finite."""

    def __init__(self, graph: str, output: str, error: str, backend: str = "onnxruntime"):
        self.graph, self.output, self.error, self.backend = graph, output, error, backend
        super().__init__(f"validation of {graph} on {backend} failed for output {output}: {error}")


@dataclass
class OutputCheck:
    """The comparison of one output at one batch size."""

    graph: str
    precision: str
    backend: str
    batch: int
    output: str
    max_abs: float
    max_ref: float
    atol: float
    rtol: float
    #: max over elements of |diff| / (atol + rtol |ref|); <= 1 passes
    ratio: float
    finite: bool
    passed: bool
    seed: int
    seconds: float
    error: str = ""
    #: the ONNX file checked (``model.opt.onnx``, ``model.ort.onnx``); empty when not recorded
    model: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def ort_session(path: str | os.PathLike, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0,
                low_memory: bool = False):
    """A validation session (:func:`profusion_rt.runtime.ort_engine.create_session`): intra-op spinning off
    (two sessions on two cores otherwise fight). ``low_memory``: no pre-packed copies of the weights
    (validation of multi-GB graphs next to the torch model; slower kernels do not matter there)."""
    ort = import_onnxruntime()
    ort.set_default_logger_severity(3)
    return create_session(path, providers, threads=threads or None, spinning=False, low_memory=low_memory)


def compare(spec: GraphSpec, precision: str, backend: str, batch: int, seed: int, name: str,
            got: np.ndarray, ref: torch.Tensor, seconds: float, model: str = "") -> OutputCheck:
    """Compare one output; never raises (the result says what failed)."""
    atol, rtol = spec.tolerance_for(precision)
    ref64 = ref.detach().double().cpu().numpy()
    got64 = np.asarray(got, dtype=np.float64)
    common = dict(graph=spec.name, precision=precision, backend=backend, batch=batch, output=name,
                  atol=atol, rtol=rtol, seed=seed, seconds=seconds, model=model)
    if got64.shape != ref64.shape:
        return OutputCheck(**common, max_abs=float("inf"), max_ref=float(np.abs(ref64).max(initial=0)),
                           ratio=float("inf"), finite=False, passed=False,
                           error=f"shape {tuple(got64.shape)} differs from torch's {tuple(ref64.shape)}")
    if not np.isfinite(ref64).all():
        return OutputCheck(**common, max_abs=float("nan"), max_ref=float("nan"), ratio=float("nan"),
                           finite=False, passed=False, error="the torch reference contains NaN or Inf")
    if not np.isfinite(got64).all():
        bad = int((~np.isfinite(got64)).sum())
        return OutputCheck(**common, max_abs=float("nan"), max_ref=float(np.abs(ref64).max(initial=0)),
                           ratio=float("nan"), finite=False, passed=False,
                           error=f"{bad} of {got64.size} values are NaN or Inf")
    diff = np.abs(got64 - ref64)
    bound = atol + rtol * np.abs(ref64)
    ratio = float((diff / bound).max(initial=0.0))
    max_abs = float(diff.max(initial=0.0))
    passed = ratio <= 1.0
    error = "" if passed else (f"max abs error {max_abs:.3g} (max |ref| {float(np.abs(ref64).max()):.3g}) exceeds "
                               f"atol {atol:g} + rtol {rtol:g}*|ref| by {ratio:.2f}x")
    return OutputCheck(**common, max_abs=max_abs, max_ref=float(np.abs(ref64).max(initial=0)), ratio=ratio,
                       finite=True, passed=passed, error=error)


def draw_inputs(spec: GraphSpec, pipe: Any, batch: int, seed: int, precision: str
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(feeds in the artifact's dtypes, the same values in float32 for the torch reference)."""
    feeds32 = spec.sample_inputs(pipe, batch=batch, seed=seed, dtype=torch.float32)
    io_dtype = torch_dtype(precision_dtype(precision))
    feeds, ref_feeds = {}, {}
    for t in spec.inputs:
        v = feeds32[t.name]
        if v.is_floating_point() and not t.fixed:
            v = v.to(io_dtype)
        feeds[t.name] = v
        ref_feeds[t.name] = v.float() if v.is_floating_point() else v
    return feeds, ref_feeds


@torch.no_grad()
def torch_reference(module: torch.nn.Module, spec: GraphSpec, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = module(*(feeds[n] for n in spec.input_names))
    out = out if isinstance(out, (tuple, list)) else (out,)
    return {name: t.float().cpu() for name, t in zip(spec.output_names, out)}


def validate_onnx(spec: GraphSpec, pipe: Any, onnx_path: str | os.PathLike, precision: str = "fp32",
                  batches: Iterable[int] = (1,), seed: int | None = None,
                  module: torch.nn.Module | None = None) -> list[OutputCheck]:
    """Run the ONNX file on onnxruntime's CPU provider and the float32 torch module on the same fresh
    inputs at every batch size in ``batches``; one :class:`OutputCheck` per output and batch. Raises
    nothing for a mismatch (see :func:`raise_on_failure`)."""
    return validate_onnx_files(spec, pipe, [onnx_path], precision, batches, seed, module)


def validate_onnx_files(spec: GraphSpec, pipe: Any, onnx_paths: Sequence[str | os.PathLike], precision: str = "fp32",
                        batches: Iterable[int] = (1,), seed: int | None = None,
                        module: torch.nn.Module | None = None) -> list[OutputCheck]:
    """:func:`validate_onnx` for several ONNX files of one graph (``model.opt.onnx`` and ``model.ort.onnx``)
    on the same inputs: the torch reference runs once per batch, the sessions one at a time (one copy of
    the weights in onnxruntime at a time). Each check names its file in ``model``."""
    seed = fresh_seed() if seed is None else int(seed)
    module = module if module is not None else spec.build_module(pipe)
    cases = []
    for i, batch in enumerate(batches):
        feeds, ref_feeds = draw_inputs(spec, pipe, batch, seed + i, precision)
        cases.append((batch, seed + i, {k: v.cpu().numpy() for k, v in feeds.items()},
                      torch_reference(module, spec, ref_feeds)))
    checks = []
    for path in onnx_paths:
        sess = ort_session(path, low_memory=True)
        for batch, case_seed, feeds, ref in cases:
            start = time.perf_counter()
            outs = sess.run(list(spec.output_names), feeds)
            seconds = time.perf_counter() - start
            for name, got in zip(spec.output_names, outs):
                checks.append(compare(spec, precision, "onnxruntime", batch, case_seed, name, got, ref[name],
                                      seconds, model=os.path.basename(os.fspath(path))))
        del sess
    return checks


def raise_on_failure(checks: Iterable[OutputCheck]) -> None:
    for c in checks:
        if not c.passed:
            model = f", {c.model}" if c.model else ""
            raise ValidationError(f"{c.graph} ({c.precision}, batch {c.batch}{model})", c.output, c.error, c.backend)


def format_table(rows: Iterable[Mapping[str, Any] | OutputCheck]) -> str:
    """A Markdown table of validation results (one row per graph output and batch)."""
    lines = ["| graph | precision | backend | batch | output | max abs err | max abs ref | atol | rtol | err/tol | result |",
             "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        r = r.to_json() if isinstance(r, OutputCheck) else r
        result = "ok" if r["passed"] else ("NaN/Inf" if not r["finite"] else "FAIL")
        backend = f"{r['backend']} ({r['model']})" if r.get("model") else r["backend"]
        lines.append(f"| {r['graph']} | {r['precision']} | {backend} | {r['batch']} | {r['output']} | "
                     f"{r['max_abs']:.2e} | {r['max_ref']:.3g} | {r['atol']:g} | {r['rtol']:g} | "
                     f"{r['ratio']:.3f} | {result}{' (cached)' if r.get('cached') else ''} |")
    return "\n".join(lines)
