"""Parameter and FLOP counts per network, counted on the meta device (instant, no weights needed)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from profusion_rt.models import text as textenc
from profusion_rt.models.promptnet import PromptNet


@dataclass
class NetworkCost:
    name: str
    params: int
    flops: int  # per forward of the described call
    call: str  # what one forward means

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def _meta_twin(net: nn.Module) -> nn.Module:
    """An uninitialised copy of ``net`` on the meta device, built from its config."""

    with torch.device("meta"):
        if isinstance(net, PromptNet):
            twin = PromptNet(net.config)
        elif hasattr(type(net), "from_config") and not hasattr(net.config, "to_json_string"):
            twin = type(net).from_config(net.config)  # diffusers
        else:
            twin = type(net)(net.config)  # transformers
    return twin.eval()


def _count(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


def count_network_costs(components, resolution: int, batch: int = 1, meta: bool = True) -> list[NetworkCost]:
    """FLOPs of one forward of each network for ``batch`` images at ``resolution``.

    UNet: ``batch`` latents with a 77-token context (a guided call on k conditionings costs k times this).
    Text encoder: the layers actually used. VAE: encoder at ``resolution``, decoder from the latent.
    """

    nets = components.networks()
    twins = {k: (_meta_twin(v) if meta else v) for k, v in nets.items()}
    dev = torch.device("meta") if meta else next(nets["unet"].parameters()).device
    unet, vae = twins["unet"], twins["vae"]
    te, ie, pn = twins["text_encoder"], twins["image_encoder"], twins["promptnet"]
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    side = resolution // factor
    width = te.config.hidden_size
    x = torch.zeros(batch, 4, side, side, device=dev)
    t = torch.zeros((), dtype=torch.long, device=dev)
    ctx = torch.zeros(batch, 77, width, device=dev)
    img = torch.zeros(batch, 3, resolution, resolution, device=dev)
    vision_size = ie.config.image_size
    pix = torch.zeros(batch, 3, vision_size, vision_size, device=dev)
    n_tokens = (vision_size // ie.config.patch_size) ** 2 + 1
    tokens = torch.zeros(batch, n_tokens, ie.config.hidden_size, device=dev)
    skip = components.text_skip_layers

    def n_params(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    used = len(te.encoder.layers) - skip
    out = [
        NetworkCost("unet", n_params(unet), _count(lambda: unet(x, t, encoder_hidden_states=ctx)),
                    f"{batch}x4x{side}x{side} latent, 77-token context"),
        NetworkCost("promptnet", n_params(pn), _count(lambda: pn(x, t, tokens, x)),
                    f"{batch} reference latent + x_t, {n_tokens} image tokens"),
        NetworkCost("text_encoder", n_params(te),
                    _count(lambda: textenc.run_text_layers(te, torch.zeros(batch, 77, width, device=dev), skip)),
                    f"{batch}x77 tokens, {used} of {len(te.encoder.layers)} layers"),
        NetworkCost("image_encoder", n_params(ie), _count(lambda: ie(pixel_values=pix)),
                    f"{batch} image(s) at {vision_size}px"),
        NetworkCost("vae_encoder", n_params(vae.encoder) + n_params(vae.quant_conv or nn.Identity()),
                    _count(lambda: vae.encode(img)), f"{batch} image(s) at {resolution}px"),
        NetworkCost("vae_decoder", n_params(vae.decoder) + n_params(vae.post_quant_conv or nn.Identity()),
                    _count(lambda: vae.decode(x)), f"{batch} latent(s) -> {resolution}px"),
    ]
    return out


def sample_flops(costs: list[NetworkCost], steps: int, fusion_steps: int, reference_guidance: bool = True) -> int:
    """FLOPs of one minimal-fusion image (docs/algorithm.md, "Cost per denoising step") from per-network costs at batch 1."""
    c = {n.name: n.flops for n in costs}
    per_call = c["promptnet"] + c["text_encoder"]
    refinement = per_call + c["unet"] * (3 if reference_guidance else 2)
    fusion = fusion_steps * (per_call + 2 * c["unet"])
    once = c["vae_encoder"] + c["image_encoder"] + 2 * c["text_encoder"] + c["vae_decoder"]
    return steps * (refinement + fusion) + once


