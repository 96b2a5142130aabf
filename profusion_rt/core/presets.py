"""Model presets as data.

A preset is a plain description of every component's shape. Building it (with random weights from a seed,
or on the meta device for FLOP counting) lives in :mod:`profusion_rt.models.factory`.

* ``tiny``: Stable Diffusion 2's structure (the same block types, linear attention projections, a
  penultimate-layer text encoder, a one-token S*, the real CLIP tokenizer) at a toy size: latents 32x32,
  images 256x256, so that a 50-step fusion sample runs in seconds on two CPU cores.
* ``sd2-base``: the exact shapes of SD2-base at 512 px (UNet, VAE, OpenCLIP ViT-H/14 text and vision
  towers) and of the released PromptNet (docs/checkpoint.md).
* ``tiny-v``: ``tiny`` with a v-prediction scheduler (the same random weights for the same seed), to test
  the v-prediction path of every backend.
* ``sd2-768``: SD2's 96x96-latent shapes with upcast attention and v-prediction, like the real
  stabilityai/stable-diffusion-2 checkpoint, for benchmarking only.
* ``toy-faces``: SD2's structure at 32x32 pixels with TRAINED weights shipped in the package
  (``profusion_rt/data/toy-faces/``), learned from scikit-image's LFW faces by
  ``benchmarks/toy/train_toy_faces.py`` (docs/toy-faces.md): the one preset whose images are learned.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from profusion_rt.core.errors import UnknownPresetError

#: SD2-base DDIM scheduler configuration (docs/algorithm.md, "The loop").
SD2_SCHEDULER: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "timestep_spacing": "leading",
}

#: The scheduler of SD2-768 (v-prediction); otherwise SD2-base's.
SD2_V_SCHEDULER: dict[str, Any] = dict(SD2_SCHEDULER, prediction_type="v_prediction")

#: OpenAI CLIP image normalisation used by the reference-image preprocessing.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preset:
    """Shapes of all components. The dicts are diffusers / transformers config keyword arguments."""

    name: str
    resolution: int
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    image_encoder: dict[str, Any]
    promptnet: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD2_SCHEDULER))
    #: Number of final text-encoder layers skipped (1 = read ``hidden_states[-2]`` like OpenCLIP/ProFusion).
    text_skip_layers: int = 1
    #: ``from_preset`` draws the weights from a seed (every preset today): commands announce it
    #: (:func:`announce_random_weights`), ``/healthz`` and image metadata say so (:func:`weights_label`).
    random_weights: bool = True
    #: Trained weights shipped in the package (a safetensors file under ``profusion_rt/data/``, keys
    #: ``<component>.<tensor>``): ``build_components`` loads them instead of drawing random ones.
    shipped_weights: str | None = None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def text_width(self) -> int:
        return int(self.text_encoder["hidden_size"])

    def copy(self) -> "Preset":
        return copy.deepcopy(self)


_SD2_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD2_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
_VAE_DOWN = ("DownEncoderBlock2D",) * 4
_VAE_UP = ("UpDecoderBlock2D",) * 4


def _unet(channels, heads, layers, cross_dim, sample_size, upcast=False) -> dict[str, Any]:
    return {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": _SD2_DOWN,
        "up_block_types": _SD2_UP,
        "block_out_channels": tuple(channels),
        "layers_per_block": layers,
        "attention_head_dim": tuple(heads),
        "cross_attention_dim": cross_dim,
        "use_linear_projection": True,
        "upcast_attention": upcast,
        "norm_num_groups": 32,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
    }


def _vae(channels, layers, sample_size) -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": _VAE_DOWN[: len(channels)],
        "up_block_types": _VAE_UP[: len(channels)],
        "block_out_channels": tuple(channels),
        "layers_per_block": layers,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": sample_size,
        "scaling_factor": 0.18215,
        "act_fn": "silu",
    }


def _promptnet(
    unet: dict[str, Any], vision_width: int, region_kernel: int, output_kernel: int | None, proj_channels: int
) -> dict:
    return {
        "sample_size": unet["sample_size"],
        "in_channels": 4,
        "block_out_channels": unet["block_out_channels"],
        "layers_per_block": unet["layers_per_block"],
        "attention_head_dim": unet["attention_head_dim"],
        "cross_attention_dim": unet["cross_attention_dim"],
        "prompt_channel": unet["cross_attention_dim"],
        "vision_width": vision_width,
        "region_kernel_size": region_kernel,
        "region_output_kernel_size": output_kernel,
        "region_proj_channel": proj_channels,
        "upcast_attention": unet["upcast_attention"],
    }


def _text(hidden, layers, heads, intermediate) -> dict[str, Any]:
    return {
        "vocab_size": 49408,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": hidden,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }


def _vision(hidden, layers, heads, intermediate, image_size, patch) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "image_size": image_size,
        "patch_size": patch,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 1024 if hidden == 1280 else hidden,
    }


def _tiny(name: str = "tiny", scheduler: dict[str, Any] | None = None) -> Preset:
    unet = _unet((32, 64, 64, 64), (2, 4, 4, 4), 1, 64, 32)
    return Preset(
        name=name,
        scheduler=dict(scheduler or SD2_SCHEDULER),
        resolution=256,
        unet=unet,
        vae=_vae((32, 32, 64, 64), 1, 256),
        text_encoder=_text(64, 4, 2, 128),
        image_encoder=_vision(64, 2, 2, 128, 56, 14),
        # latent 32x32: head maps are 4x4 (kernels 8,4,2,1,1,1), the output conv has kernel 4.
        promptnet=_promptnet(unet, 64, 8, 4, 32),
    )


def _sd2(resolution: int, upcast: bool) -> Preset:
    latent = resolution // 8
    unet = _unet((320, 640, 1280, 1280), (5, 10, 20, 20), 2, 1024, latent, upcast)
    return Preset(
        name="sd2-base" if resolution == 512 else "sd2-768",
        resolution=resolution,
        unet=unet,
        vae=_vae((128, 256, 512, 512), 2, resolution),
        text_encoder=_text(1024, 24, 16, 4096),
        image_encoder=_vision(1280, 32, 16, 5120, 224, 14),
        promptnet=_promptnet(unet, 1280, 8, None, 128),
        scheduler=dict(SD2_SCHEDULER if resolution == 512 else SD2_V_SCHEDULER),
    )


#: The toy-faces preset's shipped weights (benchmarks/toy/train_toy_faces.py writes them; docs/toy-faces.md).
TOY_FACES_WEIGHTS = "data/toy-faces/toy-faces.safetensors"


def _toy_faces() -> Preset:
    """SD2's structure at 32x32 pixels, trained on scikit-image's LFW faces (docs/toy-faces.md): a VAE with
    three levels (8x8x4 latents), a four-level cross-attention UNet, 32-wide CLIP-style text and image towers
    (frozen at their seeded random init), PromptNet from the UNet's encoder half (one S* token)."""
    unet = _unet((32, 32, 64, 64), (2, 2, 4, 4), 1, 32, 8)
    return Preset(
        name="toy-faces",
        resolution=32,
        unet=unet,
        vae=_vae((32, 32, 64), 1, 32),
        text_encoder=_text(32, 2, 2, 64),
        image_encoder=_vision(32, 2, 2, 64, 32, 8),
        # latent 8x8: the head maps are 1x1 (kernels 8,4,2,1,1,1), the output conv has kernel 1 -> one token.
        promptnet=_promptnet(unet, 32, 8, 1, 32),
        # v-prediction (SD2-768's): at 8x8 latents an epsilon model's x0 estimate at high noise carries
        # 1/sqrt(alpha_bar) = 14x its error, which fixed each image's brightness from the seed (docs/toy-faces.md).
        scheduler=dict(SD2_V_SCHEDULER),
        random_weights=False,
        shipped_weights=TOY_FACES_WEIGHTS,
    )


_PRESETS = {"tiny": _tiny, "tiny-v": lambda: _tiny("tiny-v", SD2_V_SCHEDULER), "sd2-base": lambda: _sd2(512, False), "sd2-768": lambda: _sd2(768, True),
            "toy-faces": _toy_faces}


def preset_names() -> list[str]:
    return list(_PRESETS)


#: The one line every command (generate, serve, export, demo) logs for a pipeline with random weights.
RANDOM_WEIGHTS_WARNING = ("model {name!r} has RANDOM weights (a preset drawn from a seed): its images are noise-like "
                          "and only good for testing and timing; pass a model folder to --model for real weights")


def has_random_weights(pipe) -> bool:
    """Whether ``pipe`` (a pipeline, a runtime or an artifact pipeline) runs random preset weights; set by
    ``ProFusionPipeline.from_preset`` from :attr:`Preset.random_weights`."""
    pipe = getattr(pipe, "pipe", pipe)  # a Runtime holds its pipeline in .pipe
    return bool(getattr(pipe, "random_weights", False))


def weights_label(pipe) -> str:
    """``"random (preset tiny)"`` for random preset weights, ``"loaded"`` for a pipeline loaded from a model
    folder, ``"not recorded (...)"`` for one that does not know (a runtime from artifacts alone): the
    ``weights`` field of ``/healthz`` and of the images' metadata."""
    inner = getattr(pipe, "pipe", pipe)
    if has_random_weights(inner):
        return f"random (preset {getattr(inner, 'preset', None) or 'unknown'})"
    if not hasattr(inner, "random_weights"):
        preset = getattr(inner, "preset", None)
        return f"not recorded (exported from preset {preset})" if preset else "not recorded"
    return "loaded"


def announce_random_weights(pipe, log=None) -> bool:
    """Log :data:`RANDOM_WEIGHTS_WARNING` once (warning level) when ``pipe`` has random weights."""
    import logging

    if not has_random_weights(pipe):
        return False
    inner = getattr(pipe, "pipe", pipe)
    (log or logging.getLogger("profusion_rt")).warning(
        RANDOM_WEIGHTS_WARNING.format(name=getattr(inner, "preset", None) or "preset"))
    return True


def get_preset(name: str) -> Preset:
    """Return a fresh copy of the named preset; :class:`UnknownPresetError` for an unknown name."""
    try:
        factory = _PRESETS[name]
    except KeyError:
        raise UnknownPresetError(
            f"unknown preset {name!r}; known presets: {', '.join(_PRESETS)}"
        ) from None
    return factory()
