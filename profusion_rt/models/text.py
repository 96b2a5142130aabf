"""Prompt encoding with S* inserted (docs/algorithm.md, "The loop").

The text encoder is a ``transformers.CLIPTextModel``. It is driven layer by layer here because the
ProFusion conditioning replaces one row of the token+position embeddings by S*, reads the hidden state
``skip_layers`` before the last layer, applies the final layer norm and then scales the placeholder row.
transformers 5.x's ``CLIPTextModel`` accepts no ``inputs_embeds``, so the embeddings, the causal layers
and the final norm are called directly.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


def causal_mask(length: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Additive (1, 1, L, L) mask: 0 on and below the diagonal, the dtype's minimum above."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.triu(mask, diagonal=1)[None, None]


_TAKES_CAUSAL: dict[type, bool] = {}


def _layer_takes_causal_mask(layer_cls: type) -> bool:
    # transformers 4.x: layer(hidden, attention_mask, causal_attention_mask) -> tuple
    # transformers 5.x: layer(hidden, attention_mask) -> tensor
    if layer_cls not in _TAKES_CAUSAL:
        _TAKES_CAUSAL[layer_cls] = "causal_attention_mask" in inspect.signature(layer_cls.forward).parameters
    return _TAKES_CAUSAL[layer_cls]


def run_text_layers(text_encoder: nn.Module, hidden: torch.Tensor, skip_layers: int) -> torch.Tensor:
    """Causal transformer layers (all but the last ``skip_layers``) then the final layer norm."""
    layers = text_encoder.encoder.layers
    used = len(layers) - skip_layers
    mask = causal_mask(hidden.shape[1], hidden.dtype, hidden.device)
    for layer in layers[:used]:
        if _layer_takes_causal_mask(type(layer)):
            hidden = layer(hidden, None, mask)[0]
        else:
            hidden = layer(hidden, mask)
    return text_encoder.final_layer_norm(hidden)


def token_embeddings(text_encoder: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Token + position embeddings (B, L, D) of ``input_ids`` (constant per request)."""
    return text_encoder.embeddings(input_ids=input_ids)


def encode_with_placeholder(
    text_encoder: nn.Module,
    embeds: torch.Tensor,
    placeholder_mask: torch.Tensor,
    s_star: torch.Tensor,
    scale: torch.Tensor | float,
    skip_layers: int,
) -> torch.Tensor:
    """Conditioning C[scale * S*] (B, L, D).

    ``embeds``: token+position embeddings (B, L, D); ``placeholder_mask``: (B, L) float, 1.0 at the
    placeholder row (all zeros for a prompt without one); ``s_star``: (B, 1, D). The placeholder row of the
    embeddings is replaced by S* (no positional term), and after the final layer norm the same row of the
    output is multiplied by ``scale``. Written with arithmetic masks so it exports as a static graph.
    """
    m = placeholder_mask.to(embeds.dtype).unsqueeze(-1)
    hidden = embeds * (1.0 - m) + s_star.to(embeds.dtype) * m
    out = run_text_layers(text_encoder, hidden, skip_layers)
    return out * (1.0 + m * (scale - 1.0))


def encode_plain(text_encoder: nn.Module, input_ids: torch.Tensor, skip_layers: int) -> torch.Tensor:
    """Conditioning of a prompt without placeholder (empty prompt, class-word prompt)."""
    return run_text_layers(text_encoder, token_embeddings(text_encoder, input_ids), skip_layers)
