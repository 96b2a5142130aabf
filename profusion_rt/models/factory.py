"""Build the components of a preset with random weights (from a seed) or on the meta device."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from profusion_rt.core.errors import ModelLoadError
from profusion_rt.core.presets import Preset
from profusion_rt.models.promptnet import PromptNet
from profusion_rt.models.tokenizer import load_default_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class Components:
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    image_encoder: nn.Module
    promptnet: nn.Module
    scheduler: Any
    tokenizer: Any
    text_skip_layers: int = 1
    clip_projections: nn.Module | None = None  # CLIP's projection heads (evaluation only; models/clip_heads.py)

    def networks(self) -> dict[str, nn.Module]:
        return {
            "unet": self.unet,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "image_encoder": self.image_encoder,
            "promptnet": self.promptnet,
        }


def build_unet(cfg: dict[str, Any]) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**cfg)


def build_vae(cfg: dict[str, Any]) -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**cfg)


def build_text_encoder(cfg: dict[str, Any]) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**cfg)
    config._attn_implementation = "sdpa"
    return CLIPTextModel(config)


def build_image_encoder(cfg: dict[str, Any]) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(**cfg)
    config._attn_implementation = "sdpa"
    return CLIPVisionModel(config)


def build_promptnet(cfg: dict[str, Any]) -> nn.Module:
    return PromptNet(cfg)


def build_scheduler(cfg: dict[str, Any]) -> Any:
    """DDIM from any SD scheduler config (the release ships SD2-base's PNDM config; its sampler is DDIM):
    keys DDIM does not take (``skip_prk_steps``, ...) are left out instead of logged as a warning."""
    import inspect

    from diffusers import DDIMScheduler

    accepted = set(inspect.signature(DDIMScheduler.__init__).parameters) - {"self"}
    ignored = sorted(k for k in cfg if not k.startswith("_") and k not in accepted)
    if ignored:
        logger.debug("scheduler config keys DDIM does not take: %s", ", ".join(ignored))
    return DDIMScheduler.from_config({k: v for k, v in cfg.items() if k in accepted})


def _break_constant_parameters(nets: dict[str, nn.Module], seed: int) -> None:
    """Give every parameter that default initialisation leaves constant (norm scales of 1, biases of 0) a
    small seeded perturbation. Trained checkpoints never have two weights with identical values; random
    models that do are unrealistic, and ONNX exporters merge identical initializers, which would hide which
    weight is which (the runtime's weight hot-swap locates weights in exported graphs)."""
    g = torch.Generator().manual_seed(seed + 0x9E37)
    with torch.no_grad():
        for net in nets.values():
            for param in net.parameters():
                flat = param.reshape(-1)
                if flat.numel() > 1 and bool((flat == flat[0]).all()):
                    noise = torch.randn(param.shape, generator=g, dtype=torch.float32) * 0.02
                    param.add_(noise.to(param.device, param.dtype))


def shipped_weights_path(preset: Preset) -> Path:
    """The file of ``preset``'s shipped weights inside the installed package."""
    return Path(__file__).resolve().parents[1] / str(preset.shipped_weights)


def load_shipped_weights(nets: dict[str, nn.Module], preset: Preset) -> None:
    """Load the preset's shipped safetensors (keys ``<component>.<tensor>``, any float dtype) into ``nets``;
    :class:`ModelLoadError` when the file is missing or does not match the preset's shapes."""
    from safetensors.torch import load_file

    path = shipped_weights_path(preset)
    if not path.is_file():
        raise ModelLoadError(f"the weights of preset {preset.name!r} are missing from the package ({path}); "
                             "reinstall profusion-rt")
    tensors = load_file(str(path))
    for name, net in nets.items():
        prefix = f"{name}."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            net.load_state_dict(own, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ModelLoadError(f"{path}: {name} does not match preset {preset.name!r} ({first})") from None
    logger.debug("loaded the shipped weights of preset %s from %s", preset.name, path)


def build_components(preset: Preset, seed: int = 0, device: str | torch.device = "cpu") -> Components:
    """All components of ``preset`` with random weights drawn from ``seed`` (the global RNG state is left
    untouched). ``device="meta"`` builds shapes only, for parameter and FLOP counting. On CUDA the networks
    are initialised directly on the device (fast for the SD2 shapes; the values differ from a CPU build of
    the same seed, as the device's random generator differs). A preset with ``shipped_weights``
    (``toy-faces``) gets its trained weights from the package instead."""

    dev = torch.device(device)
    on_device = dev.type in ("meta", "cuda")
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), (
            dev if on_device else contextlib.nullcontext()):
        torch.manual_seed(seed)
        nets = {
            "unet": build_unet(preset.unet),
            "vae": build_vae(preset.vae),
            "text_encoder": build_text_encoder(preset.text_encoder),
            "image_encoder": build_image_encoder(preset.image_encoder),
            "promptnet": build_promptnet(preset.promptnet),
        }
    if dev.type != "meta":
        _break_constant_parameters(nets, seed)
        if preset.shipped_weights:
            load_shipped_weights(nets, preset)
    for net in nets.values():
        net.eval().requires_grad_(False)
        if not on_device:
            net.to(dev)
    return Components(
        **nets,
        scheduler=build_scheduler(preset.scheduler),
        tokenizer=load_default_tokenizer(),
        text_skip_layers=preset.text_skip_layers,
    )
