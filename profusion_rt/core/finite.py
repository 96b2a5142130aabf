"""The finite-value guard: a NaN or Inf latent or image is a typed error naming the stage, never an image.

Reduced precision overflows: an fp16 UNet or VAE decoder (its 512-wide attention, its GroupNorms) can turn
activations into Inf and then NaN. Such an image must not be returned as a black or white picture. One
helper serves every caller:

* :func:`check_finite` checks one tensor now (one host synchronisation) and raises
  :class:`~profusion_rt.core.errors.NonFiniteError` naming the stage: ``"latents after the loop"`` (the
  runtime, once after its loop), ``"VAE decode"`` (the decoder's output);
* :class:`FiniteGuard` records, per stage call of the eager loop, whether its output is finite as a flag
  on the device (no synchronisation inside the loop) and :meth:`FiniteGuard.check` reads them once after
  the loop, naming the first stage and step that went non-finite (``"fusion stage"``,
  ``"refinement stage"``).

The message advises float32 (and an fp32 VAE decoder) when the computation ran in fp16 or bf16.
"""

from __future__ import annotations

import torch

from profusion_rt.core import dtypes
from profusion_rt.core.errors import NonFiniteError

def precision_name(precision) -> str | None:
    """"fp16" for torch.float16 or "fp16"; None for None."""
    if precision is None:
        return None
    if isinstance(precision, torch.dtype):
        return dtypes.precision_name(precision)
    return str(precision)


def advice(stage: str, precision=None) -> str:
    """What to try, for a non-finite result of ``stage`` computed in ``precision``."""
    name = precision_name(precision)
    if name in ("fp16", "bf16"):
        if stage == "VAE decode":
            return (f"{name} overflowed in the VAE decoder: decode with an fp32 VAE (--precision fp32, "
                    "for exported artifacts an fp32 vae_decoder)")
        return f"{name} overflowed: run in fp32 (--precision fp32)"
    where = f" in {name}" if name else ""
    return (f"this happened{where}: check the weights and inputs; if the engines run in fp16 "
            "(--precision fp16), try --precision fp32")


def _message(stage: str, bad: int, total: int, precision, detail: str = "") -> str:
    return (f"{stage}{detail} produced non-finite values ({bad} of {total} NaN or Inf); no image returned. "
            f"{advice(stage, precision)}")


def check_finite(tensor: torch.Tensor, stage: str, precision=None, detail: str = "") -> torch.Tensor:
    """``tensor`` unchanged when every value is finite; :class:`NonFiniteError` naming ``stage`` otherwise.

    ``precision`` (a torch dtype or "fp16"/"bf16"/"fp32") selects the advice; ``detail`` is appended to the
    stage name (e.g. ``" (onnxruntime backend)"``). One host synchronisation: call it outside loops."""
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int(finite.numel() - finite.sum())
        raise NonFiniteError(_message(stage, bad, finite.numel(), precision, detail), stage=stage)
    return tensor


class FiniteGuard:
    """Per-stage finite flags of a sampling loop, kept on the device; :meth:`check` once after the loop.

    ``watch(x, stage, step)`` costs one small reduction on the device and no host synchronisation."""

    def __init__(self, precision=None):
        self.precision = precision
        self._names: list[tuple[str, int]] = []
        self._flags: list[torch.Tensor] = []

    def watch(self, x: torch.Tensor, stage: str, step: int) -> torch.Tensor:
        self._names.append((stage, int(step)))
        self._flags.append(torch.isfinite(x).all())
        return x

    def check(self) -> None:
        """:class:`NonFiniteError` naming the first stage call whose output was not finite."""
        if not self._flags:
            return
        flags = torch.stack(self._flags).cpu()  # the one synchronisation
        if bool(flags.all()):
            return
        first = int((~flags).nonzero()[0, 0])
        stage, step = self._names[first]
        raise NonFiniteError(
            f"{stage} at step {step + 1} of {max(s for _, s in self._names) + 1} produced non-finite values "
            f"(NaN or Inf); no image returned. {advice(stage, self.precision)}", stage=stage)
