"""``profusion-rt convert``: load a model in any accepted layout (or from the hub) and write it in our
safetensors layout, verified by a reload before it takes the destination's place."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from profusion_rt.core.errors import ModelLoadError, OutputPathError
from profusion_rt.core.fsio import replace_dir
from profusion_rt.models.factory import Components
from profusion_rt.models.loading import load_components, save_components
from profusion_rt.pipeline.eager import ProFusionPipeline


def convert_model(model: str | Path, out: str | Path, promptnet_path: str | Path | None = None,
                  overwrite: bool = False, **hub: Any) -> dict[str, Any]:
    """Load ``model`` (any accepted layout or hub id) and write it in our safetensors layout at ``out``,
    atomically: the result is written and verified (reloaded, every tensor and the scheduler, tokenizer and
    text settings equal to the loaded source) in a temporary sibling folder, which only then takes ``out``'s
    place. Returns ``{"path", "tensors", "dropped"}`` (``dropped``: what the source holds that our layout
    does not keep, e.g. the release's unused residual heads)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputPathError(f"{out} is not empty (pass --overwrite / overwrite=True to replace it)")
    components, meta = load_components(model, promptnet_path, **hub)
    pipe = ProFusionPipeline.from_components(components, resolution=meta.get("resolution"), preset=meta.get("preset"))
    tmp = out.parent / f".{out.name}.convert-{uuid.uuid4().hex[:8]}"
    try:
        save_components(pipe, tmp)
        reloaded, reloaded_meta = load_components(tmp)
        tensors = _verify_same(components, reloaded)
        if reloaded_meta.get("resolution") != pipe.resolution:
            raise ModelLoadError(f"conversion check failed: resolution {reloaded_meta.get('resolution')} after "
                                 f"reload, {pipe.resolution} before")
        replace_dir(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, (ModelLoadError, OutputPathError)):
            raise OutputPathError(f"cannot write model to {out}: {exc}") from exc
        raise
    return {"path": out, "tensors": tensors, "dropped": list(meta.get("dropped", []))}


def _verify_same(a: Components, b: Components) -> int:
    """Every tensor of every network, the scheduler config, the tokenizer and ``text_skip_layers`` equal;
    the number of tensors compared. :class:`ModelLoadError` on the first difference."""
    n = 0
    for name, net in a.networks().items():
        sa, sb = net.state_dict(), b.networks()[name].state_dict()
        if set(sa) != set(sb):
            key = sorted(set(sa) ^ set(sb))[0]
            raise ModelLoadError(f"conversion check failed: component {name!r} tensor {key} is not in both")
        for key, value in sa.items():
            if value.shape != sb[key].shape or not torch.equal(value, sb[key]):
                raise ModelLoadError(f"conversion check failed: component {name!r} tensor {key} differs after reload")
            n += 1
    public = lambda cfg: {k: v for k, v in dict(cfg).items() if not k.startswith("_")}  # noqa: E731
    if public(a.scheduler.config) != public(b.scheduler.config):
        raise ModelLoadError("conversion check failed: the scheduler config differs after reload")
    if a.tokenizer.get_vocab() != b.tokenizer.get_vocab() or a.tokenizer.pad_token_id != b.tokenizer.pad_token_id:
        raise ModelLoadError("conversion check failed: the tokenizer differs after reload")
    if a.text_skip_layers != b.text_skip_layers:
        raise ModelLoadError("conversion check failed: text_skip_layers differs after reload")
    return n
