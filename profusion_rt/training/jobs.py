"""The two training jobs with their outputs: PromptNet pre-training and single-image customization.

Output folder layout (``out_dir``):

* ``model/``: the full trained model, written by ``save_pretrained`` (loadable by ``from_pretrained``);
* ``subject.delta.safetensors`` (customization): the changed tensors only, see
  :mod:`profusion_rt.training.delta`;
* ``checkpoints/step-NNNNNNN.safetensors``: training checkpoints (see
  :mod:`profusion_rt.training.checkpoint`), periodic, on Ctrl-C, and at the end of pre-training.

Nothing on disk is damaged: a non-empty ``out_dir`` is refused unless ``overwrite`` (or ``resume``, which
may add checkpoints but refuses to replace finished outputs without ``overwrite``); every file is written
atomically and the outputs are only written once training finished.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from profusion_rt.core.errors import InvalidParameterError, OutputPathError
from profusion_rt.training.augment import FILL_MODES, Inpainter, augmentation_record, customization_images
from profusion_rt.training.data import SubjectImageDataset, derive_seed
from profusion_rt.training.delta import save_delta
from profusion_rt.training.trainer import OFFICIAL_PRETRAIN_STEPS, Trainer, TrainConfig, TrainResult, check_steps

logger = logging.getLogger(__name__)

MODEL_DIR = "model"
DELTA_NAME = "subject.delta.safetensors"
CHECKPOINT_DIR = "checkpoints"


@dataclass
class JobResult:
    train: TrainResult
    out_dir: Path | None = None
    model_dir: Path | None = None
    delta_path: Path | None = None
    base_fingerprint: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def interrupted(self) -> bool:
        return self.train.interrupted


def prepare_output_dir(out_dir: str | os.PathLike, outputs: tuple[str, ...], overwrite: bool = False,
                       resume: bool = False) -> Path:
    """Check (before any work) that ``out_dir`` may be written; create it. :class:`OutputPathError` if not."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"output {out} exists and is not a folder")
    if out.is_dir() and not overwrite:
        if not resume and any(out.iterdir()):
            raise OutputPathError(f"output folder {out} is not empty (pass --overwrite to replace its outputs, "
                                  "or --resume to continue a run)")
        done = [name for name in outputs if (out / name).exists()]
        if done:
            raise OutputPathError(f"{out / done[0]} already exists (pass --overwrite to replace it)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputPathError(f"cannot write to output folder {out}: {exc.strerror or exc}") from exc
    return out


def _train(pipe, dataset: SubjectImageDataset, config: TrainConfig, steps: int, out: Path | None,
           resume: str | os.PathLike | None, checkpoint_every: int, keep_checkpoints: int, final_checkpoint: bool,
           progress: bool, callback, data_fingerprint: str | None,
           timings: dict[str, float]) -> tuple[Trainer, TrainResult]:
    start = time.perf_counter()
    trainer = Trainer(pipe, dataset, config, data_fingerprint=data_fingerprint)
    if resume is not None:
        trainer.load_checkpoint(resume)
    timings["setup"] = time.perf_counter() - start
    result = trainer.run(
        steps, checkpoint_dir=None if out is None else out / CHECKPOINT_DIR, checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints, final_checkpoint=final_checkpoint and out is not None,
        progress=progress, callback=callback,
    )
    timings["train"] = result.seconds
    return trainer, result


def pretrain(pipe, data: str | os.PathLike | SubjectImageDataset, out_dir: str | os.PathLike | None = None,
             steps: int = OFFICIAL_PRETRAIN_STEPS, config: TrainConfig | None = None, *,
             group_by_subject: bool = False,
             overwrite: bool = False, resume: str | os.PathLike | None = None, checkpoint_every: int = 0,
             keep_checkpoints: int = 2, progress: bool = True,
             callback: Callable[[Trainer, float], None] | None = None) -> JobResult:
    """Pre-train ``pipe``'s PromptNet in place on an image folder (or a dataset) for ``steps`` steps.

    With ``out_dir``: writes ``model/`` and a final checkpoint (and periodic ones). Ctrl-C saves a
    checkpoint and returns a result with ``interrupted`` set, writing no model.
    """
    config = config or TrainConfig()
    if config.mode != "pretrain":
        raise InvalidParameterError(f"pretrain needs a config with mode='pretrain', got {config.mode!r}")
    config.validate()
    check_steps(steps)
    out = prepare_output_dir(out_dir, (MODEL_DIR,), overwrite, resume is not None) if out_dir is not None else None
    dataset = data if isinstance(data, SubjectImageDataset) else SubjectImageDataset.from_folder(
        data, pipe.resolution, group_by_subject=group_by_subject)
    timings: dict[str, float] = {}
    trainer, run = _train(pipe, dataset, config, steps, out, resume, checkpoint_every, keep_checkpoints, True,
                          progress, callback, None, timings)
    result = JobResult(run, out, base_fingerprint=trainer.base_fingerprint, timings=timings)
    if run.interrupted:
        return result
    trainer.finalize()
    if out is not None:
        start = time.perf_counter()
        result.model_dir = pipe.save_pretrained(out / MODEL_DIR, overwrite=overwrite)
        timings["save"] = time.perf_counter() - start
    return result


def customize(pipe, image, out_dir: str | os.PathLike | None = None, steps: int = 100,
              config: TrainConfig | None = None, *, num_augmentations: int = 31, fill: str = "border",
              inpainter: Inpainter | None = None, overwrite: bool = False,
              resume: str | os.PathLike | None = None, checkpoint_every: int = 0, keep_checkpoints: int = 2,
              final_checkpoint: bool = False, progress: bool = True, delta_dtype=None, save_model: bool = True,
              callback: Callable[[Trainer, float], None] | None = None) -> JobResult:
    """Customize ``pipe`` in place on one subject photo: PromptNet and the UNet's attention q/k/v.

    The training set is the photo plus ``num_augmentations`` augmentations
    (:func:`~profusion_rt.training.augment.customization_images`, seeded from ``config.seed``). With
    ``out_dir``: writes ``model/`` (unless ``save_model=False``) and ``subject.delta.safetensors`` (in
    ``delta_dtype``, default float32). Ctrl-C saves a checkpoint and returns with ``interrupted`` set.
    """
    config = config or TrainConfig.customization()
    if config.mode != "customize":
        raise InvalidParameterError(f"customize needs a config with mode='customize', got {config.mode!r}")
    config.validate()
    check_steps(steps)
    if fill not in FILL_MODES:
        raise InvalidParameterError(f"fill must be one of {', '.join(FILL_MODES)}, got {fill!r}")
    outputs = (MODEL_DIR, DELTA_NAME) if save_model else (DELTA_NAME,)
    out = prepare_output_dir(out_dir, outputs, overwrite, resume is not None) if out_dir is not None else None

    timings: dict[str, float] = {}
    if inpainter is None and num_augmentations > 0:
        logger.warning("no inpainting model: the augmentations' blank areas get the %r fill, without the face box "
                       "(the official notebook inpaints them with SD2-inpainting: pass --inpaint-model)", fill)
    augmentation = augmentation_record(inpainter, fill)
    start = time.perf_counter()
    images = customization_images(image, pipe.resolution, num_augmentations, derive_seed(config.seed, "augment"),
                                  fill, inpainter)
    timings["augment"] = time.perf_counter() - start
    dataset = SubjectImageDataset(images, pipe.resolution, subjects=["subject"] * len(images))
    # The run is identified by the photo and the augmentation settings (an inpainting model need not be
    # bitwise reproducible, so its output is not part of the identity).
    identity = hashlib.sha256(dataset.uint8(0).numpy().tobytes())
    identity.update(f"{num_augmentations}/{fill}/{inpainter is not None}".encode())
    trainer, run = _train(pipe, dataset, config, steps, out, resume, checkpoint_every, keep_checkpoints,
                          final_checkpoint, progress, callback, identity.hexdigest(), timings)
    result = JobResult(run, out, base_fingerprint=trainer.base_fingerprint, timings=timings)
    if run.interrupted:
        return result
    trainer.finalize()
    if out is not None:
        start = time.perf_counter()
        training: dict[str, Any] = {
            "steps": trainer.step, "config": config.to_dict(), "num_augmentations": num_augmentations,
            "fill": "inpainting" if inpainter is not None else fill, "augmentation": augmentation,
        }
        if save_model:
            result.model_dir = pipe.save_pretrained(out / MODEL_DIR, overwrite=overwrite)
        result.delta_path = save_delta(out / DELTA_NAME, pipe, trainer.base_fingerprint, delta_dtype, training)
        timings["save"] = time.perf_counter() - start
    return result
