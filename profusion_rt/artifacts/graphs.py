"""The torch modules behind every exported graph.

Each graph of :mod:`profusion_rt.artifacts.specs` is one of these modules called with its inputs in the
spec's order. They are thin wrappers over the same functions the eager pipeline uses
(:mod:`profusion_rt.models.text`, :mod:`profusion_rt.models.vision`, the fused stages of
:mod:`profusion_rt.models.stages`), so an exported graph, the runtime's torch backend and the reference
pipeline compute the same thing. They hold references to the pipeline's networks (no copies).
"""

from __future__ import annotations

import torch
from torch import nn

from profusion_rt.models import text as textenc
from profusion_rt.models.stages import FusionStage, RefinementStage
from profusion_rt.models.vision import image_tokens

__all__ = [
    "TextEncoderGraph",
    "TextEncoderPlaceholderGraph",
    "ImageEncoderGraph",
    "VaeEncoderGraph",
    "VaeDecoderGraph",
    "PromptNetGraph",
    "UNetGraph",
    "FusionStage",
    "RefinementStage",
]


class TextEncoderGraph(nn.Module):
    """input_ids (B, 77) int64 -> context (B, 77, D): the prompt conditioning without placeholder
    (hidden state ``text_skip_layers`` before the last layer, then the final layer norm)."""

    def __init__(self, text_encoder: nn.Module, text_skip_layers: int):
        super().__init__()
        self.text_encoder = text_encoder
        self.text_skip_layers = int(text_skip_layers)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return textenc.encode_plain(self.text_encoder, input_ids, self.text_skip_layers)


class TextEncoderPlaceholderGraph(nn.Module):
    """C[scale * S*]: token embeddings with the placeholder row replaced by S*, the text layers, and the
    placeholder row of the output scaled by ``embedding_scale`` (shape (1,))."""

    def __init__(self, text_encoder: nn.Module, text_skip_layers: int):
        super().__init__()
        self.text_encoder = text_encoder
        self.text_skip_layers = int(text_skip_layers)

    def forward(self, token_embeds, placeholder_mask, s_star, embedding_scale):
        scale = embedding_scale.to(token_embeds.dtype)
        return textenc.encode_with_placeholder(
            self.text_encoder, token_embeds, placeholder_mask, s_star, scale, self.text_skip_layers
        )


class ImageEncoderGraph(nn.Module):
    """pixels (B, 3, H, W) in [0, 1] at the reference resolution -> CLIP image tokens (B, T, V).
    The CLIP preprocessing (bicubic resize, normalisation) is part of the graph; it runs in float32."""

    def __init__(self, image_encoder: nn.Module):
        super().__init__()
        self.image_encoder = image_encoder

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = image_tokens(self.image_encoder, pixels.float())
        return out.to(pixels.dtype)


class VaeEncoderGraph(nn.Module):
    """pixels (B, 3, H, W) in [0, 1] -> posterior ``mean`` and ``std`` (B, 4, h, w), both already multiplied
    by the VAE scaling factor, so that z_ref = mean + std * eps (``mode="mean"``: z_ref = mean)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, pixels: torch.Tensor):
        dist = self.vae.encode(pixels * 2.0 - 1.0).latent_dist
        return dist.mean * self.scaling_factor, dist.std * self.scaling_factor


class VaeDecoderGraph(nn.Module):
    """latents (B, 4, h, w) (scaled, as sampled) -> images (B, 3, H, W) in [0, 1], exactly as
    :meth:`ProFusionPipeline.decode`: decode(z / scaling_factor), then (y / 2 + 0.5) clamped to [0, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        y = self.vae.decode(latents / self.scaling_factor).sample
        return (y / 2 + 0.5).clamp(0, 1)


class PromptNetGraph(nn.Module):
    """PromptNet(sample=z_ref, timestep (1,), encoder_hidden_states=image tokens, promptnet_cond=x_t) -> S*."""

    def __init__(self, promptnet: nn.Module):
        super().__init__()
        self.promptnet = promptnet

    def forward(self, sample, timestep, encoder_hidden_states, promptnet_cond):
        return self.promptnet(sample, timestep, encoder_hidden_states, promptnet_cond)


class UNetGraph(nn.Module):
    """UNet(sample, timestep (1,), encoder_hidden_states) -> eps (the ``.sample`` of diffusers' output)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
