"""What the UNet predicts, and its conversion to the ε that the fusion and refinement formulas use.

SD2-base predicts the noise ε (``prediction_type="epsilon"``); SD2-768 checkpoints predict the velocity
v = √a·ε − √(1−a)·x0 (``"v_prediction"``), with a = a_t = ᾱ_t. Given x_t = √a·x0 + √(1−a)·ε:

    ε  = √a·v + √(1−a)·x_t
    x̂0 = √a·x_t − √(1−a)·v

Both conversions are affine in the model output with weights that do not depend on it, so classifier-free
guidance (whose weights sum to one) may combine raw outputs first and convert once, as diffusers does.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from profusion_rt.core.errors import InvalidParameterError

EPSILON = "epsilon"
V_PREDICTION = "v_prediction"
PREDICTION_TYPES = (EPSILON, V_PREDICTION)


def prediction_type(config: Mapping[str, Any] | str | None) -> str:
    """The validated ``prediction_type`` of a scheduler config (or of the string itself); "epsilon" when the
    config does not say. :class:`InvalidParameterError` for any other kind (e.g. diffusers' "sample")."""
    value = config if isinstance(config, str) or config is None else config.get("prediction_type", EPSILON)
    value = EPSILON if value is None else value
    if value not in PREDICTION_TYPES:
        raise InvalidParameterError(
            f"unsupported prediction_type {value!r}; supported: {', '.join(PREDICTION_TYPES)}")
    return value


def v_to_epsilon(v: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """ε = √a·v + √(1−a)·x_t."""
    return alpha**0.5 * v + (1 - alpha) ** 0.5 * x


def v_to_x0(v: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x̂0 = √a·x_t − √(1−a)·v."""
    return alpha**0.5 * x - (1 - alpha) ** 0.5 * v


def to_epsilon(output: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, kind: str) -> torch.Tensor:
    """The model output as ε (unchanged, the same tensor, for an ε-prediction model)."""
    if kind == EPSILON:
        return output
    if kind == V_PREDICTION:
        return v_to_epsilon(output, x, alpha)
    raise InvalidParameterError(f"unsupported prediction_type {kind!r}; supported: {', '.join(PREDICTION_TYPES)}")
