"""Reference-image features: CLIP vision tokens and the VAE latent (docs/checkpoint.md)."""

from __future__ import annotations

import torch
from torch import nn

from profusion_rt.core.presets import CLIP_MEAN, CLIP_STD


#: Antialiasing of the CLIP resize. The official code (train.py and the notebook/pipeline) runs torchvision's
#: ``Resize(224, BICUBIC)`` on a tensor with ``antialias`` unset; its environment (May 2023, torchvision
#: unpinned: 0.15) did not antialias tensors then (the default turned on in 0.17), so neither do we.
CLIP_ANTIALIAS = False


def clip_preprocess(images: torch.Tensor, size: int, antialias: bool = CLIP_ANTIALIAS) -> torch.Tensor:
    """[0, 1] images (B, 3, H, W) -> bicubic resize to ``size`` in float32 (``antialias`` off by default, as
    the official code's torchvision did for tensors; see :data:`CLIP_ANTIALIAS`) -> OpenAI-CLIP
    normalisation. No crop: the reference is already square."""
    # float32: as torchvision (it resizes half tensors in float32); the antialiased bicubic kernel also has
    # no half-precision CPU implementation
    x = nn.functional.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=antialias,
                                  align_corners=False)
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def image_tokens(image_encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """CLIP vision tokens: last encoder layer, before the post-layernorm, (B, 1 + patches, width)."""
    size = int(image_encoder.config.image_size)
    pixels = clip_preprocess(images, size).to(image_encoder.dtype)
    return image_encoder(pixel_values=pixels).last_hidden_state


def vae_encode(
    vae: nn.Module, images: torch.Tensor, mode: str, generator: torch.Generator | None
) -> torch.Tensor:
    """[0, 1] images -> scaled latents. ``mode="sample"`` draws the posterior noise from ``generator`` on
    the CPU (device independent); ``"mean"`` takes the posterior mean."""
    dist = vae.encode(images.to(vae.dtype) * 2.0 - 1.0).latent_dist
    return posterior_latents(dist.mean, dist.std, mode, generator) * vae.config.scaling_factor


def posterior_latents(mean: torch.Tensor, std: torch.Tensor, mode: str,
                      generator: torch.Generator | None) -> torch.Tensor:
    """The VAE posterior's ``mean`` (``mode="mean"``) or a draw ``mean + std * eps``, with ``eps`` float32
    noise from ``generator`` on the CPU (device independent)."""
    if mode == "mean":
        return mean
    eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean)
    return mean + std * eps
