"""Training checkpoints: one safetensors file per checkpoint, written atomically.

Tensors (all float32 unless noted):

* ``param.<key>``: the trainable weights, ``<key>`` = ``promptnet.<name>`` / ``unet.<name>`` (delta keys);
* ``optim.exp_avg.<key>``, ``optim.exp_avg_sq.<key>``, ``optim.step.<key>``: AdamW's state per parameter;
* ``ema.<key>``: the EMA shadow weights (only with EMA);
* ``rng.generator``: the run's ``torch.Generator`` state (uint8), which draws references, VAE posterior
  noise, timesteps and diffusion noise;
* ``log.losses``: the loss of every step so far.

Metadata: ``format`` = ``"profusion-rt-train-checkpoint"``, ``format_version`` = ``"1"`` and ``state``, a JSON
object with ``step``, ``config`` (the :class:`~profusion_rt.training.trainer.TrainConfig`), ``sampler``
(epoch and position of the data order), ``scaler`` (fp16 loss-scaler state or null), ``base_fingerprint``
(the trainable tensors' values before training) and ``data_fingerprint``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from profusion_rt.core.safeio import json_field, read, read_metadata, save_atomic
from profusion_rt.training.errors import CheckpointError

logger = logging.getLogger(__name__)

FORMAT = "profusion-rt-train-checkpoint"
FORMAT_VERSION = "1"
_NAME = re.compile(r"^step-(\d+)\.safetensors$")


def checkpoint_name(step: int) -> str:
    return f"step-{int(step):07d}.safetensors"


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "state": json.dumps(state, sort_keys=True)}
    target = save_atomic(path, tensors, metadata)
    logger.info("checkpoint: step %s -> %s", state.get("step"), target)
    return target


def _state(source: Path, metadata: dict[str, str]) -> dict[str, Any]:
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{source} is not a profusion-rt training checkpoint")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{source} is checkpoint format version {metadata.get('format_version')!r}; "
                              f"this build reads {FORMAT_VERSION}")
    return json_field(metadata, "state", source, CheckpointError)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and JSON state of a checkpoint file (or of the latest one in a folder)."""
    source = find_checkpoint(path)
    tensors, metadata = read(source, CheckpointError, "checkpoint")
    return tensors, _state(source, metadata)


def read_checkpoint_state(path: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The resolved checkpoint file and its JSON state, without reading the tensors."""
    source = find_checkpoint(path)
    return source, _state(source, read_metadata(source, CheckpointError, "checkpoint"))


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files of ``folder`` in step order."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a file; for a folder, its latest checkpoint (or that of its ``checkpoints``)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        found = list_checkpoints(p) or list_checkpoints(p / "checkpoints")
        if found:
            return found[-1]
        raise CheckpointError(f"no checkpoint (step-*.safetensors) in {p}")
    raise CheckpointError(f"checkpoint {p} does not exist")

