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

import contextlib
import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from profusion_rt.core.errors import ModelLoadError, OutputPathError
from profusion_rt.core.fsio import replace_dir
from profusion_rt.models.clip_heads import FOLDER as CLIP_HEADS_FOLDER
from profusion_rt.models.clip_heads import ClipProjections
from profusion_rt.models.factory import Components, build_scheduler
from profusion_rt.models.hub import WEIGHT_STEMS, resolve_model_path
from profusion_rt.models.promptnet import PromptNet, PromptNetConfig
from profusion_rt.models.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

FORMAT_KEY = "profusion_rt"
WEIGHT_NAMES = tuple(f"{stem}{ext}" for ext, stems in WEIGHT_STEMS.items() for stem in stems)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def read_state_dict(file: Path, component: str | None = None) -> dict[str, torch.Tensor]:
    """safetensors, or a torch pickle read with ``weights_only=True`` (memory-mapped when the file allows);
    typed error on a bad file."""
    where = f"component {component!r}: " if component else ""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format: no mmap
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means a bad file
        raise ModelLoadError(f"{where}cannot read weights {file}: {_first_line(exc)}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{where}{file} does not hold a state dict of tensors")
    return state


def weight_files(folder: Path, component: str) -> list[Path]:
    """The weight files of a component folder: one file or an index's shards, safetensors before ``.bin``
    (the order of :data:`WEIGHT_NAMES`)."""
    for ext, stems in WEIGHT_STEMS.items():
        for stem in stems:
            single = folder / f"{stem}{ext}"
            if single.is_file():
                return [single]
            index = folder / f"{stem}{ext}.index.json"
            if index.is_file():
                weight_map = _read_json(index, component).get("weight_map")
                if not isinstance(weight_map, dict) or not weight_map:
                    raise ModelLoadError(f"component {component!r}: {index} has no weight_map")
                shards = [folder / name for name in sorted(set(weight_map.values()))]
                missing = [s.name for s in shards if not s.is_file()]
                if missing:
                    raise ModelLoadError(f"component {component!r}: {index} names shard {missing[0]}, which is "
                                         f"missing from {folder}")
                return shards
    raise ModelLoadError(f"component {component!r}: {folder} holds no weights file (expected one of "
                         f"{', '.join(WEIGHT_NAMES)} or a sharded index)")


def _read_weights(folder: Path, component: str) -> tuple[dict[str, torch.Tensor], list[Path]]:
    files = weight_files(folder, component)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(read_state_dict(file, component))
    return state, files


def _find(dirs: list[Path], name: str) -> Path | None:
    for d in dirs:
        if (d / name).is_dir():
            return d / name
    return None


def _read_json(file: Path, component: str | None = None) -> dict[str, Any]:
    where = f"component {component!r}: " if component else ""
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{where}missing {file}") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{where}cannot read {file}: {_first_line(exc)}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{where}{file} does not hold a JSON object")
    return data


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


def check_state_dict(component: str, where: Path | str, state: dict[str, torch.Tensor],
                     expected: dict[str, torch.Tensor]) -> None:
    """Raise :class:`ModelLoadError` naming the first tensor that is missing, unexpected or of another shape
    than the config's network expects."""
    for key, ref in expected.items():
        if key in state and _shape(state[key]) != _shape(ref):
            raise ModelLoadError(
                f"component {component!r}: tensor {key} has shape {list(_shape(state[key]))} in {where}, but the "
                f"config builds {list(_shape(ref))}")
    missing = [k for k in expected if k not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"component {component!r}: tensor {missing[0]} is missing from {where}{more}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ModelLoadError(f"component {component!r}: {where} holds tensor {unexpected[0]}, which the config "
                             f"does not build{more}")


def _rename_legacy_attention(state: dict[str, torch.Tensor], expected: dict[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers <= 0.15 named the VAE's attention ``query``/``key``/``value``/``proj_attn``; now
    ``to_q``/``to_k``/``to_v``/``to_out.0``."""
    renames = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    out = {}
    for key, value in state.items():
        if key not in expected:
            parts = key.split(".")
            if len(parts) >= 2 and parts[-2] in renames:
                new = ".".join(parts[:-2] + [renames[parts[-2]], parts[-1]])
                if new in expected and new not in state:
                    key = new
        out[key] = value
    return out


def _realign(model: torch.nn.Module) -> torch.nn.Module:
    """Give every tensor that is not 64-byte aligned its own aligned memory. safetensors hands out views of
    the memory-mapped file at the file's (8-byte aligned) offsets; oneDNN's convolutions then take other code
    paths and round differently than on the same weights in aligned memory, so a model would not sample
    bit-identically to its ``.bin`` twin or to the model it was saved from."""
    with torch.no_grad():
        for module in model.modules():
            for name, param in module._parameters.items():
                if param is not None and param.device.type == "cpu" and param.data_ptr() % 64:
                    param.data = param.data.clone()
            for name, buf in module._buffers.items():
                if buf is not None and buf.device.type == "cpu" and buf.data_ptr() % 64:
                    module._buffers[name] = buf.clone()
    return model


def _finish(model: torch.nn.Module, component: str) -> torch.nn.Module:
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # a non-persistent buffer that the meta-device build cannot fill
        raise ModelLoadError(f"component {component!r}: {left[0]} was not loaded")
    return _realign(model.eval().requires_grad_(False).float())


def load_diffusers_model(component: str, cls: type, folder: Path) -> torch.nn.Module:
    """A diffusers model (``UNet2DConditionModel``, ``AutoencoderKL``) from ``config.json`` and its weights,
    built on the meta device and filled strictly from the state dict."""
    config = _read_json(folder / "config.json", component)
    state, files = _read_weights(folder, component)
    try:
        with torch.device("meta"):
            model = cls.from_config(config)
    except Exception as exc:  # noqa: BLE001 - a config the library rejects
        raise ModelLoadError(f"component {component!r}: {folder / 'config.json'} does not describe a "
                             f"{cls.__name__}: {_first_line(exc)}") from exc
    expected = model.state_dict()
    state = _rename_legacy_attention(state, expected)
    check_state_dict(component, files[0] if len(files) == 1 else folder, state, expected)
    model.load_state_dict(state, strict=True, assign=True)
    return _finish(model, component)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers logs a WARNING "load report" table before our one-line error would say the same."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_transformers_model(component: str, cls: type, folder: Path) -> torch.nn.Module:
    """A transformers CLIP model through its ``from_pretrained`` (its key conversions vary by version), with
    the weights file chosen here and every missing, unexpected or mis-shaped tensor turned into a
    :class:`ModelLoadError`."""
    _read_json(folder / "config.json", component)
    files = weight_files(folder, component)
    use_safetensors = files[0].suffix == ".safetensors" or files[0].name.endswith(".safetensors.index.json")
    for file in files:
        if file.suffix == ".bin":
            read_state_dict(file, component)  # weights_only check first; a bad file gets our message
    try:
        with _quiet_transformers():
            model, info = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=use_safetensors,
                                              output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as exc:  # noqa: BLE001 - library errors become one clear line
        raise ModelLoadError(f"cannot load component {component!r} from {folder}: {_first_line(exc)}") from exc
    where = files[0] if len(files) == 1 else folder
    for key, *shapes in sorted(info.get("mismatched_keys") or [], key=str):
        detail = f"shape {list(shapes[0])} in {where}, but the config builds {list(shapes[1])}" \
            if len(shapes) == 2 else f"another shape in {where} than the config builds"
        raise ModelLoadError(f"component {component!r}: tensor {key} has {detail}")
    missing = sorted(k for k in info.get("missing_keys") or [] if "position_ids" not in k)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"component {component!r}: tensor {missing[0]} is missing from {where}{more}")
    unexpected = sorted(k for k in info.get("unexpected_keys") or [] if "position_ids" not in k)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ModelLoadError(f"component {component!r}: {where} holds tensor {unexpected[0]}, which the config "
                             f"does not build{more}")
    if info.get("error_msgs"):
        raise ModelLoadError(f"component {component!r}: {str(info['error_msgs'][0]).strip().splitlines()[0]}")
    return _realign(model.eval().requires_grad_(False).float())


def load_promptnet(folder: Path, dropped: list[str] | None = None) -> PromptNet:
    """PromptNet from ``config.json`` (official or ours, :meth:`PromptNetConfig.from_dict`) and its weights; the
    vision width comes from ``vision_embedding.weight``. The release's unused ``residual*`` heads are dropped
    (described in ``dropped`` when a list is given)."""
    raw = _read_json(folder / "config.json", "promptnet")
    state, files = _read_weights(folder, "promptnet")
    residual = [k for k in state if "residual" in k]
    if residual and dropped is not None:
        n = sum(state[k].numel() for k in residual)
        dropped.append(f"promptnet: {len(residual)} residual-head tensors ({n / 1e6:.2f}M parameters; the "
                       "ControlNet-style heads ProFusion's sampler never uses)")
    state = {k: v for k, v in state.items() if k not in residual}
    vision = state.get("vision_embedding.weight")
    try:
        config = PromptNetConfig.from_dict(raw, vision_width=None if vision is None or vision.dim() != 2
                                           else int(vision.shape[1]))
        config.with_residual_heads = False
        with torch.device("meta"):
            net = PromptNet(config)
    except ModelLoadError as exc:
        raise ModelLoadError(f"component 'promptnet': {folder / 'config.json'}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a config the network cannot be built from
        raise ModelLoadError(f"component 'promptnet': {folder / 'config.json'} does not describe a PromptNet: "
                             f"{_first_line(exc)}") from exc
    check_state_dict("promptnet", files[0] if len(files) == 1 else folder, state, net.state_dict())
    net.load_state_dict(state, strict=True, assign=True)
    return _finish(net, "promptnet")


def _as_tower(clip: torch.nn.Module, kind: str) -> torch.nn.Module:
    """The text or vision tower of a ``CLIPModel`` as a standalone ``CLIPTextModel`` / ``CLIPVisionModel``
    (transformers 5 holds them so; 4.x holds bare transformers, which are wrapped here)."""
    from transformers import CLIPTextModel, CLIPVisionModel

    cls, tower = (CLIPTextModel, clip.text_model) if kind == "text" else (CLIPVisionModel, clip.vision_model)
    if isinstance(tower, cls):
        return tower
    config = clip.config.text_config if kind == "text" else clip.config.vision_config
    model = cls(config)
    inner = model.text_model if kind == "text" else model.vision_model
    inner.load_state_dict(tower.state_dict())
    return model.eval().requires_grad_(False).float()


def load_components(path: str | Path, promptnet_path: str | Path | None = None, *, revision: str | None = None,
                    cache_dir: str | Path | None = None, local_files_only: bool = False,
                    token: str | bool | None = None) -> tuple[Components, dict[str, Any]]:
    """Load every component; a missing one is named in a :class:`ModelLoadError`. ``path`` and
    ``promptnet_path`` are local folders or hub ids (:func:`~profusion_rt.models.hub.resolve_model_path`).

    The returned metadata holds our layout's ``profusion_rt`` entry of ``model_index.json`` and ``dropped``:
    one line per part of the source that the loaded pipeline does not keep."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel, CLIPVisionModel

    hub = dict(cache_dir=cache_dir, local_files_only=local_files_only, token=token)
    path = resolve_model_path(path, revision=revision, what="model", **hub)
    dirs = [path]
    if promptnet_path is not None:
        dirs.append(resolve_model_path(promptnet_path, what="PromptNet", **hub))
    index = _read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    meta = dict(index.get(FORMAT_KEY, {}))
    dropped: list[str] = []
    searched = ", ".join(str(d) for d in dirs)

    def need(name: str) -> Path:
        found = _find(dirs, name)
        if found is None:
            raise ModelLoadError(f"model folder is missing the {name!r} component (looked in {searched})")
        return found

    unet = load_diffusers_model("unet", UNet2DConditionModel, need("unet"))
    vae = load_diffusers_model("vae", AutoencoderKL, need("vae"))

    pn_dir = _find(dirs, "promptnet")
    if pn_dir is None and len(dirs) > 1 and (dirs[1] / "config.json").is_file():
        pn_dir = dirs[1]
    if pn_dir is None:
        raise ModelLoadError(f"model folder is missing the 'promptnet' component (looked in {searched})")
    promptnet = load_promptnet(pn_dir, dropped)

    openclip = _find(dirs, "openclip")
    text_dir, image_dir = _find(dirs, "text_encoder"), _find(dirs, "image_encoder")
    if openclip is not None and (text_dir is None or image_dir is None):
        clip = load_transformers_model("openclip", CLIPModel, openclip)
        text_encoder = _as_tower(clip, "text") if text_dir is None else None
        image_encoder = _as_tower(clip, "vision") if image_dir is None else None
        projections = ClipProjections.from_clip(clip)  # kept for evaluation (CLIP-T / CLIP-I)
        heads = [k for k in clip.state_dict()
                 if not k.startswith(("text_model.", "vision_model.", "text_projection.", "visual_projection."))]
        if heads:
            dropped.append(f"openclip: {', '.join(sorted(heads))} (not used by sampling or evaluation)")
        skip_default = 1 if text_dir is None else 0  # openclip tower: hidden_states[-2]; SD2 text_encoder: last
    else:
        text_encoder = image_encoder = None
        skip_default = 0  # a diffusers SD2 text_encoder already stops at the penultimate layer
        heads_dir = _find(dirs, CLIP_HEADS_FOLDER)
        projections = ClipProjections.load(heads_dir) if heads_dir is not None else None
    if text_encoder is None:
        text_encoder = load_transformers_model("text_encoder", CLIPTextModel, need("text_encoder"))
    if image_encoder is None:
        if image_dir is None:
            raise ModelLoadError(
                f"model folder is missing the 'image_encoder' component (no 'openclip' or 'image_encoder' in {searched})"
            )
        image_encoder = load_transformers_model("image_encoder", CLIPVisionModel, image_dir)
    width = int(image_encoder.config.hidden_size)
    if promptnet.config.vision_width != width:
        raise ModelLoadError(
            f"component 'promptnet': vision_embedding.weight takes {promptnet.config.vision_width}-wide image "
            f"tokens, but the image encoder ({'openclip' if image_dir is None else 'image_encoder'}) is {width} wide")
    for name in ("feature_extractor", "safety_checker"):
        if _find(dirs, name) is not None:
            dropped.append(f"{name}: not used by ProFusion")

    tokenizer = load_tokenizer(need("tokenizer"))
    sched_dir = need("scheduler")
    sched_cfg = _read_json(sched_dir / "scheduler_config.json", "scheduler")
    try:
        scheduler = build_scheduler(sched_cfg)  # always DDIM, from whatever scheduler config (the release: PNDM)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"component 'scheduler': cannot build DDIM from {sched_dir / 'scheduler_config.json'}: "
                             f"{_first_line(exc)}") from exc
    meta.setdefault("text_skip_layers", skip_default)
    meta["dropped"] = dropped
    meta["source"] = [str(d) for d in dirs]
    components = Components(unet, vae, text_encoder, image_encoder, promptnet, scheduler, tokenizer,
                            int(meta["text_skip_layers"]), clip_projections=projections)
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
        if getattr(pipe, "clip_projections", None) is not None:
            pipe.clip_projections.save(tmp / CLIP_HEADS_FOLDER)
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
        replace_dir(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise OutputPathError(f"cannot write model to {path}: {exc}") from exc
        raise
    return path

