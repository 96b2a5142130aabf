"""Training of the weights the runtime serves (docs/training.md): PromptNet pre-training and
single-image customization, regularization-free, plus the subject delta format.

Public API (imported lazily, so ``import profusion_rt.training`` stays cheap for the CLI):

* :func:`pretrain`, :func:`customize` (:mod:`.jobs`): whole jobs with their outputs;
* :class:`Trainer`, :class:`TrainConfig` (:mod:`.trainer`): the step and loop, checkpoints, resume;
  :func:`diffusion_loss` (one batch's loss, noise and timesteps given), :func:`training_prompt_ids`;
* :func:`promptnet_from_unet`, :func:`pipeline_from_sd2` (:mod:`.init`): the official PromptNet start;
* :class:`SubjectImageDataset` (:mod:`.data`), :func:`customization_images`, :data:`Inpainter` (:mod:`.augment`);
* :func:`save_delta`, :func:`load_delta`, :func:`apply_delta`, :func:`base_fingerprint`,
  :func:`extract_delta`, :class:`Delta` (:mod:`.delta`, format in ``docs/delta_format.md``).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "pretrain": "jobs",
    "customize": "jobs",
    "JobResult": "jobs",
    "Trainer": "trainer",
    "TrainConfig": "trainer",
    "TrainResult": "trainer",
    "diffusion_loss": "trainer",
    "training_prompt_ids": "trainer",
    "promptnet_from_unet": "init",
    "pipeline_from_sd2": "init",
    "SubjectImageDataset": "data",
    "customization_images": "augment",
    "Inpainter": "augment",
    "diffusers_inpainter": "augment",
    "Delta": "delta",
    "save_delta": "delta",
    "load_delta": "delta",
    "apply_delta": "delta",
    "extract_delta": "delta",
    "base_fingerprint": "delta",
    "DatasetError": "errors",
    "CheckpointError": "errors",
    "DeltaError": "errors",
    "DeltaMismatchError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
