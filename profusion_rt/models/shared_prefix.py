"""One UNet call on k conditionings that share x_t, computing the context-free prefix once.

Every guided UNet call of ProFusion evaluates the same x_t and t under k conditionings (k = 2 in the fusion
stage, 3 in the refinement stage). The reference batches them: ``unet(cat([x] * k), t, cat(contexts))``.
Everything the UNet computes before its first cross-attention depends on x_t and t only, so it is the
same for the k copies: the time embedding, ``conv_in``, the first ResNet of the first down block and, in
that block's first transformer, the input norm and projection and the whole self-attention (at the
largest resolution, the most expensive attention of the network). :func:`shared_prefix_eps` computes
that prefix once per image and repeats it k times right before the first cross-attention; the rest of
the network runs on the k*b batch exactly as in the reference.

The result equals the reference call up to float rounding (tested element by element in
``tests/models/test_shared_prefix.py``). Only the SD2 UNet layout is handled (diffusers
``UNet2DConditionModel`` with a cross-attention first block, layer-norm transformer blocks, no class,
addition or hint embeddings, no encoder projection); :func:`supports_shared_prefix` says whether a UNet
qualifies, and :func:`shared_prefix_eps` falls back to the plain batched call when it does not.

The eager reference pipeline keeps the plain batched call (it is the ground truth); the fused stage
modules, and so every exported and compiled backend, use this.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def _tile(t: torch.Tensor, k: int) -> torch.Tensor:
    """cat([t] * k) along the batch axis (Tile in ONNX; no chunk/split, so batch stays symbolic)."""
    return t.repeat(k, *([1] * (t.dim() - 1)))


def _plain_block(block: nn.Module) -> bool:
    return (getattr(block, "norm_type", None) == "layer_norm" and not getattr(block, "only_cross_attention", True)
            and getattr(block, "pos_embed", None) is None and getattr(block, "attn2", None) is not None
            and getattr(block, "_chunk_size", None) is None and not hasattr(block, "fuser"))


def supports_shared_prefix(unet: nn.Module) -> bool:
    """True for the SD2 UNet layout that :func:`shared_prefix_eps` knows how to split."""
    cfg = getattr(unet, "config", None)
    if cfg is None or not hasattr(unet, "get_time_embed"):
        return False
    if any(getattr(unet, name, None) is not None
           for name in ("class_embedding", "add_embedding", "encoder_hid_proj", "time_embed_act")):
        return False
    if cfg.get("center_input_sample") or cfg.get("addition_embed_type") is not None:
        return False
    first = unet.down_blocks[0]
    if not getattr(first, "has_cross_attention", False) or not len(first.attentions):
        return False
    att = first.attentions[0]
    return (getattr(att, "is_input_continuous", False) and getattr(att, "use_linear_projection", False)
            and len(att.transformer_blocks) >= 1 and _plain_block(att.transformer_blocks[0]))


def _first_transformer(att: nn.Module, h: torch.Tensor, context: torch.Tensor, k: int) -> torch.Tensor:
    """Transformer2DModel (linear projections) on b images whose k conditionings share ``h``: norm,
    proj_in, norm1 and self-attention at batch b; then tiled to k*b for cross-attention and the rest."""
    b, c, height, width = h.shape
    residual = h
    y = att.norm(h).permute(0, 2, 3, 1).reshape(b, height * width, c)
    y = att.proj_in(y)
    block = att.transformer_blocks[0]
    y = block.attn1(block.norm1(y)) + y
    y = _tile(y, k)
    y = block.attn2(block.norm2(y), encoder_hidden_states=context) + y
    y = block.ff(block.norm3(y)) + y
    for block in att.transformer_blocks[1:]:
        y = block(y, encoder_hidden_states=context)
    y = att.proj_out(y)
    y = y.reshape(k * b, height, width, y.shape[-1]).permute(0, 3, 1, 2).contiguous()
    return y + _tile(residual, k)


def shared_prefix_eps(unet: nn.Module, x: torch.Tensor, timestep: torch.Tensor,
                      contexts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``unet(cat([x] * k), timestep, cat(contexts)).sample`` with the context-free prefix computed once.

    ``x`` (b, 4, h, w); ``timestep`` a scalar, (1,) or (b,) tensor; ``contexts`` k tensors (b, L, D).
    Returns (k*b, 4, h, w), ordered like the reference (conditioning-major)."""
    k = len(contexts)
    context = torch.cat(list(contexts))
    if not supports_shared_prefix(unet):
        return unet(_tile(x, k), timestep, encoder_hidden_states=context).sample

    up_factor = 2 ** unet.num_upsamplers
    forward_upsample_size = any(d % up_factor != 0 for d in x.shape[-2:])

    emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=timestep), None)  # (b, C)
    emb_k = _tile(emb, k)
    h = unet.conv_in(x)
    skips: tuple[torch.Tensor, ...] = (_tile(h, k),)

    # First down block: its first ResNet and the self-attention part of its first transformer at batch b.
    first = unet.down_blocks[0]
    for i, (resnet, attn) in enumerate(zip(first.resnets, first.attentions)):
        if i == 0:
            h = _first_transformer(attn, resnet(h, emb), context, k)
        else:
            h = attn(resnet(h, emb_k), encoder_hidden_states=context, return_dict=False)[0]
        skips += (h,)
    for down in first.downsamplers or ():
        h = down(h)
        skips += (h,)

    for block in unet.down_blocks[1:]:
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=emb_k, encoder_hidden_states=context)
        else:
            h, res = block(hidden_states=h, temb=emb_k)
        skips += res

    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            h = unet.mid_block(h, emb_k, encoder_hidden_states=context)
        else:
            h = unet.mid_block(h, emb_k)

    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        res, skips = skips[-n:], skips[:-n]
        size = skips[-1].shape[2:] if forward_upsample_size and i < len(unet.up_blocks) - 1 else None
        if getattr(block, "has_cross_attention", False):
            h = block(hidden_states=h, temb=emb_k, res_hidden_states_tuple=res, encoder_hidden_states=context,
                      upsample_size=size)
        else:
            h = block(hidden_states=h, temb=emb_k, res_hidden_states_tuple=res, upsample_size=size)

    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)
