"""The fusion stage's variance-preserving re-noise update (docs/algorithm.md, "The loop", fusion stage).

With a = a_t, a' = a_{t'}:  σ² = η² (1 − a')/(1 − a) (1 − a/a'),  and

    x_t ← x_t − ê σ² √(1−a)/(1−a') + σ z √((1−a)(2 − 2a' − σ²))/(1−a')

which equals √a x̂0 + √(1−a) [(1−k) ê + √(2k − k²) z] with k = σ²/(1−a'). For η = 1 it is, in
distribution, a DDPM ancestral step t → t' followed by forward noising t' → t.
"""

from __future__ import annotations

import torch


def fusion_sigma2(alpha: torch.Tensor, alpha_prev: torch.Tensor, eta: float | torch.Tensor) -> torch.Tensor:
    return eta**2 * (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)


def fusion_coefficients(
    alpha: torch.Tensor, alpha_prev: torch.Tensor, eta: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_eps, c_noise) of the update x ← x − c_eps ê + c_noise z, computed in float64 then cast to
    float32 (per-step constants, precomputed once per request)."""
    a = alpha.double()
    ap = alpha_prev.double()
    s2 = fusion_sigma2(a, ap, float(eta))
    c_eps = s2 * (1 - a) ** 0.5 / (1 - ap)
    c_noise = s2**0.5 * ((1 - a) * (2 - 2 * ap - s2)).clamp(min=0) ** 0.5 / (1 - ap)
    return c_eps.float(), c_noise.float()


def fusion_update(
    x: torch.Tensor, eps_hat: torch.Tensor, noise: torch.Tensor, c_eps: torch.Tensor, c_noise: torch.Tensor
) -> torch.Tensor:
    """x ← x − c_eps ê + c_noise z."""
    return x - c_eps * eps_hat + c_noise * noise
