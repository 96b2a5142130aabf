"""Reading and writing model folders.

Accepted layouts (``from_pretrained``):

* **released ProFusion**: ``model_index.json``; ``unet``, ``vae``, ``promptnet``, ``openclip`` (a
  transformers ``CLIPModel``: its text tower is read at the penultimate layer, its vision tower gives the
  image tokens), ``tokenizer``, ``scheduler``; weights as ``.bin`` (read with ``weights_only=True``) or
  ``.safetensors``.
* **ours** (what ``save_pretrained`` writes): the same, but ``text_encoder`` and ``image_encoder`` as
  separate transformers folders, every weight in safetensors, and a ``profusion_rt`` entry in
  ``model_index.json`` (text layers skipped, resolution, preset name).
* **plain SD2 + PromptNet**: a diffusers SD2 folder (its ``text_encoder`` already ends at the penultimate
  layer, so it is read at its last layer) plus a second folder holding ``promptnet`` and either
  ``openclip`` or ``image_encoder`` (or a bare PromptNet folder with ``config.json`` at its top).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError, OutputPathError
from .factory import Components, build_scheduler
from .promptnet import PromptNet, PromptNetConfig, drop_unused_keys

logger = logging.getLogger(__name__)

FORMAT_KEY = "profusion_rt"
WEIGHT_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "pytorch_model.bin",
                "diffusion_pytorch_model.bin")


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """safetensors, or a torch pickle read with ``weights_only=True``; typed error on a bad file."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means a bad file
        raise ModelLoadError(f"cannot read weights {file}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc


def _find(dirs: list[Path], name: str) -> Path | None:
    for d in dirs:
        if (d / name).is_dir():
            return d / name
    return None


def _weights_file(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise ModelLoadError(f"{folder} holds no weights file (expected one of {', '.join(WEIGHT_NAMES)})")


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"missing {file}") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {file}: {exc}") from exc


def _library_load(component: str, loader, folder: Path):
    _weights_file(folder)
    try:
        model = loader(str(folder), local_files_only=True)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - library errors become one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load component {component!r} from {folder}: {first}") from exc
    return model.eval().requires_grad_(False).float()


def load_promptnet(folder: Path) -> PromptNet:
    config = PromptNetConfig.from_dict(_read_json(folder / "config.json"))
    config.with_residual_heads = False
    state = drop_unused_keys(read_state_dict(_weights_file(folder)))
    net = PromptNet(config)
    result = net.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"PromptNet weights in {folder} do not match its config: "
            f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[:2]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:2]})"
        )
    return net.eval().requires_grad_(False).float()


def load_components(path: Path, promptnet_path: Path | None = None) -> tuple[Components, dict[str, Any]]:
    """Load every component; a missing one is named in a :class:`ModelLoadError`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel, CLIPVisionModel

    from .tokenizer import load_tokenizer

    if not path.is_dir():
        raise ModelLoadError(f"model folder {path} does not exist or is not a folder")
    dirs = [path]
    if promptnet_path is not None:
        if not promptnet_path.is_dir():
            raise ModelLoadError(f"PromptNet folder {promptnet_path} does not exist or is not a folder")
        dirs.append(promptnet_path)
    index = _read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    meta = dict(index.get(FORMAT_KEY, {}))
    searched = ", ".join(str(d) for d in dirs)

    def need(name: str) -> Path:
        found = _find(dirs, name)
        if found is None:
            raise ModelLoadError(f"model folder is missing the {name!r} component (looked in {searched})")
        return found

    unet = _library_load("unet", UNet2DConditionModel.from_pretrained, need("unet"))
    vae = _library_load("vae", AutoencoderKL.from_pretrained, need("vae"))

    pn_dir = _find(dirs, "promptnet")
    if pn_dir is None and promptnet_path is not None and (promptnet_path / "config.json").is_file():
        pn_dir = promptnet_path
    if pn_dir is None:
        raise ModelLoadError(f"model folder is missing the 'promptnet' component (looked in {searched})")
    promptnet = load_promptnet(pn_dir)

    openclip = _find(dirs, "openclip")
    text_dir, image_dir = _find(dirs, "text_encoder"), _find(dirs, "image_encoder")
    if openclip is not None and (text_dir is None or image_dir is None):
        clip = _library_load("openclip", CLIPModel.from_pretrained, openclip)
        text_encoder = clip.text_model if text_dir is None else None
        image_encoder = clip.vision_model if image_dir is None else None
        skip_default = 1 if text_dir is None else 0  # openclip tower: hidden_states[-2]; SD2 text_encoder: last
    else:
        text_encoder = image_encoder = None
        skip_default = 0  # a diffusers SD2 text_encoder already stops at the penultimate layer
    if text_encoder is None:
        text_encoder = _library_load("text_encoder", CLIPTextModel.from_pretrained, need("text_encoder"))
    if image_encoder is None:
        if image_dir is None:
            raise ModelLoadError(
                f"model folder is missing the 'image_encoder' component (no 'openclip' or 'image_encoder' in {searched})"
            )
        image_encoder = _library_load("image_encoder", CLIPVisionModel.from_pretrained, image_dir)

    tokenizer = load_tokenizer(need("tokenizer"))
    sched_dir = need("scheduler")
    scheduler = build_scheduler(_read_json(sched_dir / "scheduler_config.json"))
    meta.setdefault("text_skip_layers", skip_default)
    components = Components(unet, vae, text_encoder, image_encoder, promptnet, scheduler, tokenizer,
                            int(meta["text_skip_layers"]))
    logger.info("loaded model from %s", searched)
    return components, meta


def _state_dict_contiguous(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_components(pipe, path: Path, overwrite: bool = False) -> Path:
    """Write the pipeline in our layout, atomically: everything goes to a temporary sibling folder that is
    renamed into place at the end, so an interrupted save never leaves a half-written model."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputPathError(f"{path} is not empty (pass overwrite=True to replace it)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as exc:
        raise OutputPathError(f"cannot write to {path.parent}: {exc.strerror or exc}") from exc
    try:
        pipe.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        pipe.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        pipe.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        pipe.image_encoder.save_pretrained(tmp / "image_encoder", safe_serialization=True)
        (tmp / "promptnet").mkdir()
        pipe.promptnet.save_config(tmp / "promptnet")
        save_file(_state_dict_contiguous(pipe.promptnet), str(tmp / "promptnet" / "model.safetensors"))
        pipe.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        pipe.scheduler.save_pretrained(tmp / "scheduler")
        index = {
            "_class_name": "ProFusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "image_encoder": ["transformers", "CLIPVisionModel"],
            "promptnet": ["profusion_rt", "PromptNet"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"],
            FORMAT_KEY: {
                "text_skip_layers": pipe.text_skip_layers,
                "resolution": pipe.resolution,
                "preset": pipe.preset,
            },
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise OutputPathError(f"cannot write model to {path}: {exc}") from exc
        raise
    return path
