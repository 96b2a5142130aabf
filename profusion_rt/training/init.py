"""PromptNet initialised from an SD2 UNet, as the official pre-training starts (docs/training.md,
"Pre-training from a plain SD2 folder").

The official ``train.py`` builds PromptNet with ``PromptNetModel.from_pretrained(<SD2>, subfolder="unet")``:
every PromptNet parameter whose name and shape exist in the UNet is loaded from it (``conv_in``, the time
embedding, all down blocks and the mid block: PromptNet is a clone of the UNet's encoder half with the same
names), the up path is dropped, and the layers the UNet has no counterpart for keep PyTorch's default
random initialisation (no zero-init): the noisy-latent embedding ``promptnet_cond_embedding``, the CLIP
token projection ``vision_embedding`` and the token head (``*prompt_projection*``, ``region_prompt_output``).

:func:`promptnet_from_unet` does the same from a loaded UNet; :func:`pipeline_from_sd2` assembles a
trainable pipeline from a plain SD2 folder (or hub id), a CLIP image encoder and such a fresh PromptNet.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from profusion_rt.core.errors import InvalidParameterError, ModelLoadError
from profusion_rt.models.factory import Components, build_scheduler
from profusion_rt.models.promptnet import PromptNet, PromptNetConfig
from profusion_rt.models.tokenizer import load_tokenizer
from profusion_rt.pipeline import ProFusionPipeline

logger = logging.getLogger(__name__)

#: Top-level PromptNet modules copied from the UNet (same names, same shapes).
COPIED_MODULES = ("conv_in", "time_embedding", "down_blocks", "mid_block")
#: Top-level PromptNet modules the UNet has no counterpart for: default (random) initialisation.
FRESH_MODULES = ("promptnet_cond_embedding", "vision_embedding", "first_prompt_projection",
                 "down_prompt_projections", "mid_prompt_projection", "region_prompt_output")
#: The CLIP model the official code takes the image tokens (and text tower) from.
OFFICIAL_IMAGE_ENCODER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

_SD2_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")


def _cfg(unet: nn.Module) -> dict[str, Any]:
    return dict(unet.config)


def promptnet_config_from_unet(unet: nn.Module, vision_width: int, prompt_channel: int | None = None,
                               region_kernel_size: int = 8, region_output_kernel_size: int | None = None,
                               region_proj_channel: int = 128) -> PromptNetConfig:
    """The PromptNet configuration matching ``unet``'s encoder half (diffusers ``UNet2DConditionModel``).

    ``vision_width``: width of the CLIP image tokens (1280 for OpenCLIP ViT-H/14); ``prompt_channel``: width
    of S* (default: the UNet's cross-attention width = the text encoder's, 1024 for SD2). The head's output
    kernel defaults to ``sample_size // region_kernel_size`` so that S* is one token (8 for SD2-base's 64x64
    latents, as released; 4 for the tiny preset's 32x32).
    """
    c = _cfg(unet)
    problems = []
    down = tuple(c.get("down_block_types", ()))
    if len(down) < 2 or down[-1] != "DownBlock2D" or any(b != "CrossAttnDownBlock2D" for b in down[:-1]):
        problems.append(f"down blocks {down} (expected cross-attention blocks then DownBlock2D, as {_SD2_DOWN})")
    if c.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        problems.append(f"mid block {c['mid_block_type']}")
    for key, ok in (("class_embed_type", None), ("addition_embed_type", None), ("time_cond_proj_dim", None),
                    ("encoder_hid_dim", None), ("only_cross_attention", False), ("dual_cross_attention", False)):
        if c.get(key, ok) not in (ok,):
            problems.append(f"{key}={c[key]!r}")
    for key, ok in (("time_embedding_type", "positional"), ("conv_in_kernel", 3), ("resnet_time_scale_shift", "default"),
                    ("transformer_layers_per_block", 1)):
        if c.get(key, ok) != ok:
            problems.append(f"{key}={c[key]!r}")
    if problems:
        raise InvalidParameterError("cannot build PromptNet from this UNet: unsupported " + ", ".join(problems))
    heads = c.get("num_attention_heads") or c["attention_head_dim"]
    n = len(c["block_out_channels"])
    heads = tuple(heads) if isinstance(heads, (list, tuple)) else (int(heads),) * n
    sample = int(c["sample_size"])
    if region_output_kernel_size is None:
        auto = sample // region_kernel_size
        region_output_kernel_size = None if auto == region_kernel_size else max(auto, 1)
    return PromptNetConfig(
        sample_size=sample,
        in_channels=int(c["in_channels"]),
        block_out_channels=tuple(c["block_out_channels"]),
        down_block_types=tuple(c["down_block_types"]),
        layers_per_block=int(c["layers_per_block"]),
        attention_head_dim=heads,
        cross_attention_dim=int(c["cross_attention_dim"]),
        prompt_channel=int(prompt_channel if prompt_channel is not None else c["cross_attention_dim"]),
        vision_width=int(vision_width),
        region_kernel_size=int(region_kernel_size),
        region_output_kernel_size=region_output_kernel_size,
        region_proj_channel=int(region_proj_channel),
        norm_num_groups=int(c.get("norm_num_groups", 32)),
        norm_eps=float(c.get("norm_eps", 1e-5)),
        act_fn=str(c.get("act_fn", "silu")),
        flip_sin_to_cos=bool(c.get("flip_sin_to_cos", True)),
        freq_shift=int(c.get("freq_shift", 0)),
        downsample_padding=int(c.get("downsample_padding", 1)),
        mid_block_scale_factor=float(c.get("mid_block_scale_factor", 1.0)),
        use_linear_projection=bool(c.get("use_linear_projection", False)),
        upcast_attention=bool(c.get("upcast_attention", False)),
        center_input_sample=bool(c.get("center_input_sample", False)),
    )


def copied_parameter_names(promptnet: nn.Module) -> list[str]:
    """Names of the PromptNet tensors :func:`promptnet_from_unet` copies from the UNet."""
    return [k for k in promptnet.state_dict() if k.split(".", 1)[0] in COPIED_MODULES]


def promptnet_from_unet(unet: nn.Module, vision_width: int, prompt_channel: int | None = None, *,
                        region_kernel_size: int = 8, region_output_kernel_size: int | None = None,
                        region_proj_channel: int = 128, seed: int | None = 0) -> PromptNet:
    """A new PromptNet (float32, on the CPU) for ``unet``: ``conv_in``, the time embedding, every down block
    and the mid block copied from the UNet, the other layers freshly initialised (PyTorch defaults, drawn
    from ``seed``; ``None`` uses the global RNG). The global RNG state is left untouched when seeded."""
    config = promptnet_config_from_unet(unet, vision_width, prompt_channel, region_kernel_size,
                                        region_output_kernel_size, region_proj_channel)
    if seed is None:
        net = PromptNet(config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            net = PromptNet(config)
    source = unet.state_dict()
    target = net.state_dict()
    names = copied_parameter_names(net)
    missing = [k for k in names if k not in source]
    wrong = [k for k in names if k in source and tuple(source[k].shape) != tuple(target[k].shape)]
    if missing or wrong:
        raise InvalidParameterError(
            f"the UNet does not match the PromptNet built from its config: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(wrong)} with other shapes (e.g. {wrong[:2]})")
    with torch.no_grad():
        net.load_state_dict({k: source[k].detach().to("cpu", torch.float32) for k in names}, strict=False)
    logger.info("PromptNet initialised from the UNet: %d tensors copied, %d fresh", len(names),
                len(target) - len(names))
    return net.eval().requires_grad_(False)


def promptnet_from_pipeline_unet(pipe, seed: int | None = 0, **head) -> PromptNet:
    """:func:`promptnet_from_unet` for ``pipe``'s UNet, the head settings (kernels, projection width) taken
    from ``pipe``'s current PromptNet unless given, the widths from its encoders."""
    current = getattr(pipe.promptnet, "config", None)
    defaults = {}
    if current is not None:
        defaults = {"region_kernel_size": current.region_kernel_size,
                    "region_output_kernel_size": current.region_output_kernel_size,
                    "region_proj_channel": current.region_proj_channel}
    defaults.update(head)
    net = promptnet_from_unet(pipe.unet, int(pipe.image_encoder.config.hidden_size),
                              int(pipe.text_encoder.config.hidden_size), seed=seed, **defaults)
    return net.to(pipe.device, next(pipe.unet.parameters()).dtype)


# -- plain SD2 folders ---------------------------------------------------------------------------------

def is_hub_id(model: str) -> bool:
    """``org/name`` that is not an existing path."""
    parts = str(model).split("/")
    return len(parts) == 2 and all(parts) and not Path(model).expanduser().exists() and not str(model).startswith(".")


def has_promptnet(folder: Path) -> bool:
    return (folder / "promptnet").is_dir()


def resolve_model_source(model: str, what: str = "model",
                         allow_patterns: list[str] | None = None) -> Path:
    """A local folder for ``model``: the folder itself, or a hub id fetched with ``huggingface_hub``
    (only the files named by ``allow_patterns``). :class:`ModelLoadError` when neither works."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if not is_hub_id(model):
        raise ModelLoadError(f"{what} {model} does not exist (give a folder or a hub id such as org/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), allow_patterns=allow_patterns))
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot fetch {what} {model} from the hub: {first}") from exc


def _load(component: str, loader, folder: Path, **kwargs):
    if not folder.is_dir():
        raise ModelLoadError(f"missing the {component!r} component ({folder} is not a folder)")
    try:
        model = loader(str(folder), local_files_only=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - library errors become one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load {component!r} from {folder}: {first}") from exc
    return model.eval().requires_grad_(False).float()


def load_image_encoder(source: str | Path):
    """The CLIP image tower and, when ``source`` is a full ``CLIPModel``, its text tower.

    Returns ``(vision_model, text_model_or_None)``. ``source``: a transformers ``CLIPModel`` folder (as the
    official ``openclip``), a ``CLIPVisionModel`` folder, or a hub id of either.
    """
    from transformers import CLIPModel, CLIPVisionModel

    folder = resolve_model_source(str(source), "image encoder",
                                  ["config.json", "*.safetensors", "pytorch_model.bin", "*.json", "*.txt"])
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"image encoder {folder} has no readable config.json: {exc}") from exc
    if config.get("model_type") == "clip":
        clip = _load("image encoder", CLIPModel.from_pretrained, folder)
        return clip.vision_model, clip.text_model
    return _load("image encoder", CLIPVisionModel.from_pretrained, folder), None


def find_image_encoder(root: Path, image_encoder: str | Path | None = None) -> str | Path:
    """``image_encoder`` if given, else an ``image_encoder``/``openclip`` folder in ``root``;
    :class:`ModelLoadError` naming ``--image-encoder`` otherwise (checked before anything is loaded)."""
    if image_encoder is not None:
        return image_encoder
    for name in ("image_encoder", "openclip"):
        if (Path(root) / name).is_dir():
            return Path(root) / name
    raise ModelLoadError(
        f"{root} has no CLIP image encoder (a plain SD2 folder has none): pass --image-encoder with a "
        f"transformers CLIPModel or CLIPVisionModel folder (the official one is {OFFICIAL_IMAGE_ENCODER})")


def pipeline_from_sd2(model: str | Path, image_encoder: str | Path | None = None, *, seed: int = 0,
                      device: str | torch.device = "cpu", **head):
    """A trainable :class:`~profusion_rt.pipeline.ProFusionPipeline` from a plain SD2 folder or hub id (``unet``,
    ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``) with a PromptNet from :func:`promptnet_from_unet`.

    The CLIP image encoder comes from ``image_encoder`` (a ``CLIPModel`` or ``CLIPVisionModel`` folder or hub
    id), else from an ``image_encoder``/``openclip`` folder beside the SD2 components. With a ``CLIPModel``
    (as the official code, which uses OpenCLIP's towers for both) its text tower is used, read at the
    penultimate layer; otherwise the SD2 ``text_encoder`` (already cut at the penultimate layer) is.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    root = resolve_model_source(str(model), "model", ["model_index.json", "unet/*", "vae/*", "text_encoder/*",
                                                      "tokenizer/*", "scheduler/*"])
    image_encoder = find_image_encoder(root, image_encoder)
    unet = _load("unet", UNet2DConditionModel.from_pretrained, root / "unet")
    vae = _load("vae", AutoencoderKL.from_pretrained, root / "vae")
    vision, clip_text = load_image_encoder(image_encoder)
    if clip_text is not None:
        text_encoder, skip = clip_text, 1
        logger.info("text tower: the CLIPModel's (%s), penultimate layer", image_encoder)
    else:
        text_encoder, skip = _load("text_encoder", CLIPTextModel.from_pretrained, root / "text_encoder"), 0
    tokenizer = load_tokenizer(root / "tokenizer")
    try:
        sched_cfg = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {root / 'scheduler' / 'scheduler_config.json'}: {exc}") from exc
    promptnet = promptnet_from_unet(unet, int(vision.config.hidden_size), int(text_encoder.config.hidden_size),
                                    seed=seed, **head)
    components = Components(unet, vae, text_encoder, vision, promptnet, build_scheduler(sched_cfg), tokenizer, skip)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    pipe = ProFusionPipeline.from_components(components, resolution=int(unet.config.sample_size) * vae_scale)
    return pipe.to(device, torch.float32)
