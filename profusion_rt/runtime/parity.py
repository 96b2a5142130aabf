"""Parity measures between a backend's output and the eager reference's, on the same seeds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Parity:
    latent_max_abs: float
    latent_max_rel: float  # max |a - b| / max |b|
    pixel_match: float  # fraction of decoded pixel values within 1/255
    psnr_db: float

    def ok(self, latent_rel_tol: float = 1e-4, pixel_fraction: float = 0.99) -> bool:
        return self.latent_max_rel <= latent_rel_tol and self.pixel_match >= pixel_fraction


def compare(latents: torch.Tensor, reference_latents: torch.Tensor, images: np.ndarray,
            reference_images: np.ndarray) -> Parity:
    a, b = latents.double().cpu(), reference_latents.double().cpu()
    diff = (a - b).abs()
    scale = b.abs().max().clamp(min=1e-12)
    pix = np.abs(images.astype(np.float64) - reference_images.astype(np.float64))
    mse = float(np.mean(pix**2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)
    return Parity(float(diff.max()), float(diff.max() / scale), float(np.mean(pix <= 1 / 255 + 1e-7)), psnr)
