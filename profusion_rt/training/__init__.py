"""Training of the weights the runtime serves (docs/training.md): PromptNet pre-training and
single-image customization, regularization-free, plus the subject delta format.

Public API:

* :func:`pretrain`, :func:`customize` (:mod:`.jobs`): whole jobs with their outputs;
* :class:`Trainer`, :class:`TrainConfig` (:mod:`.trainer`): the step and loop, checkpoints, resume;
  :func:`diffusion_loss` (one batch's loss, noise and timesteps given), :func:`training_prompt_ids`;
* :func:`promptnet_from_unet`, :func:`pipeline_from_sd2` (:mod:`.init`): the official PromptNet start;
* :class:`SubjectImageDataset` (:mod:`.data`), :func:`customization_images`, :data:`Inpainter` (:mod:`.augment`);
* :func:`save_delta`, :func:`extract_delta` (:mod:`.delta`); the read side :func:`load_delta`,
  :func:`apply_delta`, :func:`base_fingerprint`, :class:`Delta` lives in :mod:`profusion_rt.models.delta`
  (format in ``docs/delta_format.md``).
"""

from __future__ import annotations

from profusion_rt.core.errors import DeltaError, DeltaMismatchError
from profusion_rt.models.delta import Delta, apply_delta, base_fingerprint, load_delta
from profusion_rt.training.augment import Inpainter, customization_images, diffusers_inpainter
from profusion_rt.training.data import SubjectImageDataset
from profusion_rt.training.delta import extract_delta, save_delta
from profusion_rt.training.errors import CheckpointError, DatasetError
from profusion_rt.training.init import pipeline_from_sd2, promptnet_from_unet
from profusion_rt.training.jobs import JobResult, customize, pretrain
from profusion_rt.training.trainer import TrainConfig, Trainer, TrainResult, diffusion_loss, training_prompt_ids

__all__ = [
    "CheckpointError", "DatasetError", "Delta", "DeltaError", "DeltaMismatchError", "Inpainter", "JobResult",
    "SubjectImageDataset", "TrainConfig", "TrainResult", "Trainer", "apply_delta", "base_fingerprint", "customization_images",
    "customize", "diffusers_inpainter", "diffusion_loss", "extract_delta", "load_delta", "pipeline_from_sd2",
    "pretrain", "promptnet_from_unet", "save_delta", "training_prompt_ids",
]
