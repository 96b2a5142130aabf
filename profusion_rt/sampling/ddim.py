"""DDIM tables and the deterministic (eta = 0) DDIM step, as diffusers' DDIMScheduler computes them for
SD2's configuration (scaled-linear betas, ``steps_offset=1``, ``set_alpha_to_one=False``, leading
spacing: 981, 961, ..., 1 for 50 steps), for ε-prediction (SD2-base) and v-prediction (SD2-768) models
(:mod:`.prediction`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from profusion_rt.core.errors import InvalidParameterError
from profusion_rt.sampling.prediction import EPSILON, V_PREDICTION, prediction_type, v_to_epsilon, v_to_x0


def alphas_cumprod_table(config: dict[str, Any]) -> torch.Tensor:
    n = int(config.get("num_train_timesteps", 1000))
    start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
    schedule = config.get("beta_schedule", "scaled_linear")
    if schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
    elif schedule == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float32)
    else:
        raise InvalidParameterError(f"unsupported beta_schedule {schedule!r} (scaled_linear or linear)")
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass(frozen=True)
class DDIMSchedule:
    """The per-step tables of one sampling run.

    ``timesteps[i]`` is t of step i, ``alpha[i]`` = a_t and ``alpha_prev[i]`` = a_{t'} with
    t' = t - num_train_timesteps // steps (``final_alpha`` when t' < 0). float32 tensors on the CPU.
    ``prediction_type``: what the model predicts ("epsilon" or "v_prediction", from the scheduler config).
    """

    timesteps: torch.Tensor
    alpha: torch.Tensor
    alpha_prev: torch.Tensor
    prediction_type: str = EPSILON

    @classmethod
    def create(cls, config: dict[str, Any], num_inference_steps: int) -> "DDIMSchedule":
        n_train = int(config.get("num_train_timesteps", 1000))
        if not 1 <= num_inference_steps <= n_train:
            raise InvalidParameterError(
                f"num_inference_steps must be between 1 and {n_train}, got {num_inference_steps}"
            )
        kind = prediction_type(config)
        if config.get("timestep_spacing", "leading") != "leading":
            raise InvalidParameterError("only the 'leading' timestep spacing of SD2-base is supported")
        acp = alphas_cumprod_table(config)
        final = torch.tensor(1.0) if config.get("set_alpha_to_one", False) else acp[0]
        ratio = n_train // num_inference_steps
        ts = (torch.arange(num_inference_steps) * ratio).flip(0) + int(config.get("steps_offset", 1))
        prev = ts - ratio
        alpha = acp[ts]
        alpha_prev = torch.where(prev >= 0, acp[prev.clamp(min=0)], final)
        return cls(timesteps=ts.to(torch.int64), alpha=alpha, alpha_prev=alpha_prev, prediction_type=kind)

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])


def predict_x0(x: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x̂0 = (x - sqrt(1 - a) eps) / sqrt(a)."""
    return (x - (1 - alpha) ** 0.5 * eps) / alpha**0.5


def ddim_step(x: torch.Tensor, output: torch.Tensor, alpha: torch.Tensor, alpha_prev: torch.Tensor,
              kind: str = EPSILON) -> torch.Tensor:
    """x_{t'} = sqrt(a') x̂0 + sqrt(1 - a') eps (DDIM, eta = 0), in diffusers' order of operations.

    ``output`` is the (guided) model output of prediction type ``kind``: ε itself, or v, from which ε and
    x̂0 are both computed directly (:mod:`.prediction`), as diffusers does (not x̂0 from the converted ε,
    which would divide by √a)."""
    if kind == V_PREDICTION:
        eps, x0 = v_to_epsilon(output, x, alpha), v_to_x0(output, x, alpha)
    else:
        eps = output
        x0 = predict_x0(x, eps, alpha)
    return alpha_prev**0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps
