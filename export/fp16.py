"""The float16 variant of a graph: float16 weights and activations, float32 where SD2 needs it.

A float16 *copy* of the torch module is made before export, with GroupNorm and LayerNorm in float32, float32
attention for models configured with ``upcast_attention``, the graphs' float32 inputs kept, and the whole VAE
decoder computing in float32 inside (:class:`Float32Graph`). The exported ONNX carries the casts; the
pipeline's own float32 networks are not touched. What is kept in float32 and why: docs/export.md,
"The fp16 variant".
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.nn import functional as F

from profusion_rt.artifacts.graphs import VaeDecoderGraph

logger = logging.getLogger(__name__)

__all__ = ["to_mixed_fp16", "Float32Graph", "Fp32GroupNorm", "Fp32LayerNorm", "UpcastAttnProcessor"]


class Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype; returns the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype; returns the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


_NORMS = {nn.GroupNorm: Fp32GroupNorm, nn.LayerNorm: Fp32LayerNorm}


class Float32Graph(nn.Module):
    """A float32 network inside a float16 graph: float16 inputs are cast to float32, the network runs in
    float32, floating outputs are cast back to float16 (the graph's I/O dtypes follow the precision)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        out = self.module(*(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args))
        if isinstance(out, tuple):
            return tuple(o.half() if o.is_floating_point() else o for o in out)
        return out.half() if out.is_floating_point() else out


def _float32_graph_types() -> tuple[type, ...]:
    """Graph modules exported in float32 inside a float16 graph (docs/export.md, "The fp16 variant")."""

    return (VaeDecoderGraph,)


def to_mixed_fp16(module: nn.Module) -> nn.Module:
    """A float16 copy of ``module`` with the float32 islands described in docs/export.md. The
    copy is made tensor by tensor in float16 (the float32 weights are not duplicated as a whole). The VAE
    decoder graph is not copied: it is wrapped in :class:`Float32Graph`."""
    if isinstance(module, _float32_graph_types()):
        logger.debug("fp16 graph of %s: computed in float32 inside", type(module).__name__)
        return Float32Graph(module).eval()
    memo: dict[int, object] = {}
    # Deep-copy the structure but give every floating tensor of non-norm modules a float16 copy directly.
    norm_ids = {id(m) for m in module.modules() if type(m) in _NORMS}
    for m in module.modules():
        keep32 = id(m) in norm_ids
        for p in m.parameters(recurse=False):
            if id(p) in memo:
                continue
            data = p.detach().clone() if keep32 or not p.is_floating_point() else p.detach().to(torch.float16)
            memo[id(p)] = nn.Parameter(data, requires_grad=False)
        for b in m.buffers(recurse=False):
            if id(b) in memo:
                continue
            memo[id(b)] = b.clone() if keep32 or not b.is_floating_point() else b.to(torch.float16)
    half = copy.deepcopy(module, memo)
    n_norms = n_attn = 0
    for m in half.modules():
        if type(m) in _NORMS:
            m.__class__ = _NORMS[type(m)]
            n_norms += 1
        if _is_diffusers_attention(m) and getattr(m, "upcast_attention", False):
            m.set_processor(UpcastAttnProcessor())
            n_attn += 1
    logger.debug("fp16 copy: %d norms and %d attention layers kept in float32", n_norms, n_attn)
    return half.eval()


class UpcastAttnProcessor:
    """Attention in float32 for diffusers ``Attention`` layers of the transformer blocks (token sequences,
    no mask, no group/spatial norm: what SD2's UNet and PromptNet use). Projections stay float16."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if (attention_mask is not None or hidden_states.ndim != 3 or getattr(attn, "group_norm", None) is not None
                or getattr(attn, "spatial_norm", None) is not None or getattr(attn, "norm_q", None) is not None
                or getattr(attn, "residual_connection", False) or getattr(attn, "norm_cross", None)):
            raise NotImplementedError("UpcastAttnProcessor covers the plain transformer-block attention only")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        heads = attn.heads
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        # (B, L, heads * d) -> (B, heads, L, d) without reading the batch size (keeps it symbolic)
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2).float() for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        out = out.transpose(1, 2).flatten(2).to(hidden_states.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return out / attn.rescale_output_factor


def _is_diffusers_attention(m: nn.Module) -> bool:
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:  # pragma: no cover
        return False
    return isinstance(m, Attention)
