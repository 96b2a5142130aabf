"""Classifier-free guidance combinations (docs/algorithm.md, "The loop")."""

from __future__ import annotations

import torch


def cfg(e_uncond: torch.Tensor, e_cond: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """e_u + s (e_c - e_u)."""
    return e_uncond + scale * (e_cond - e_uncond)


def fusion_guidance(e_uncond: torch.Tensor, e_fused: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Fusion stage: ê = e_u + w_r (e_f - e_u), e_f conditioned on C[γ S*]."""
    return cfg(e_uncond, e_fused, scale)


def refinement_guidance(
    e_uncond: torch.Tensor,
    e_cond: torch.Tensor,
    e_ref: torch.Tensor | None,
    scale: torch.Tensor | float,
    reference_scale: torch.Tensor | float,
) -> torch.Tensor:
    """Refinement stage: e = e_u + s1 (e_c - e_u) + s2 (e_r - e_u); ``e_ref=None`` means e_r := e_u."""
    out = cfg(e_uncond, e_cond, scale)
    if e_ref is not None:
        out = out + reference_scale * (e_ref - e_uncond)
    return out
