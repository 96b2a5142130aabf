"""``profusion-rt pretrain``, ``profusion-rt customize`` and ``profusion-rt apply-delta``.

Inputs are checked before any model is loaded (data folder, image, output folder, checkpoint); every error
is a :class:`~profusion_rt.core.errors.ProFusionError` (one line, exit status 2). Ctrl-C during training saves a
checkpoint, prints where, and exits with status 130. Training hyper-parameters left unset on the command
line come from the checkpoint when resuming, else from the official defaults (docs/training.md).

``pretrain --model`` also takes a plain SD2 folder or hub id (no PromptNet): PromptNet is then built from
its UNet as the official pre-training does (:mod:`profusion_rt.training.init`), with the CLIP image encoder
from ``--image-encoder``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from profusion_rt.core.dtypes import PRECISION_DTYPES
from profusion_rt.core.errors import InvalidParameterError, OutputPathError
from profusion_rt.core.image_io import load_image
from profusion_rt.models.delta import apply_delta, load_delta
from profusion_rt.pipeline import ProFusionPipeline
from profusion_rt.training import init
from profusion_rt.training.augment import (
    INPAINT_NEGATIVE_PROMPT,
    INPAINT_PROMPT,
    load_inpainter,
)
from profusion_rt.training.checkpoint import read_checkpoint_state
from profusion_rt.training.data import SubjectImageDataset, list_images
from profusion_rt.training.errors import CheckpointError
from profusion_rt.training.init import find_image_encoder
from profusion_rt.training.jobs import (
    DELTA_NAME,
    MODEL_DIR,
    customize,
    prepare_output_dir,
    pretrain,
)
from profusion_rt.training.trainer import TrainConfig

#: Default pre-training length: the official 80,000 steps (at batch 8 per GPU); = trainer.OFFICIAL_PRETRAIN_STEPS
#: (kept here as a literal so that the CLI parser stays cheap to import).
OFFICIAL_PRETRAIN_STEPS = 80_000
_PRECISIONS = ("auto", "fp32", "fp16", "bf16")
#: command-line option -> TrainConfig field
_CONFIG_ARGS = {"batch_size": "batch_size", "lr": "learning_rate", "weight_decay": "weight_decay",
                "max_grad_norm": "max_grad_norm", "clip_scope": "clip_scope", "precision": "precision",
                "gradient_checkpointing": "gradient_checkpointing", "ema_decay": "ema_decay", "seed": "seed"}


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="preset name (tiny, sd2-base, sd2-768) or model folder")
    p.add_argument("--promptnet", default=None, help="separate PromptNet folder (with a plain SD2 --model)")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of the random weights of a preset")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")


def _train_args(p: argparse.ArgumentParser, steps: int, batch: int) -> None:
    p.add_argument("--out", required=True, help="output folder (model/, checkpoints/, ...)")
    p.add_argument("--steps", type=int, default=steps, help=f"total training steps (default {steps})")
    p.add_argument("--batch-size", type=int, default=None, help=f"images per step (default {batch})")
    p.add_argument("--lr", type=float, default=None, help="constant learning rate (default 2e-5)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 1e-2)")
    p.add_argument("--max-grad-norm", default=None,
                   help="gradient-norm clipping, a number or 'none' (default: 1.0 in pretrain, none in customize, "
                        "as the official code)")
    p.add_argument("--clip-scope", choices=("promptnet", "trainable"), default=None,
                   help="gradients --max-grad-norm clips: PromptNet's (default, official) or every trainable one")
    p.add_argument("--precision", choices=_PRECISIONS, default=None,
                   help="autocast: auto (fp16 on CUDA as the official runs, fp32 on CPU), fp32, fp16 (CUDA), bf16")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in backward (saves memory)")
    p.add_argument("--ema-decay", type=float, default=None, help="keep an EMA of the weights (e.g. 0.9999)")
    p.add_argument("--seed", type=int, default=None, help="seed of data order, noise and augmentations (default 0)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="write a checkpoint every N steps (0: never)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints of this run to keep")
    p.add_argument("--resume", default=None, help="checkpoint file, or folder holding checkpoints, to continue")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs in a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="pre-train PromptNet on an image folder")
    _model_args(p)
    p.add_argument("--data", required=True, help="image folder (with --group-by-subject: one sub-folder per subject)")
    p.add_argument("--group-by-subject", action="store_true",
                   help="draw each reference from the target's sub-folder instead of using the target itself")
    p.add_argument("--image-encoder", default=None,
                   help="CLIP image encoder for a plain SD2 --model: a transformers CLIPModel (its text tower is "
                        "then used too, as the official code) or CLIPVisionModel folder or hub id")
    p.add_argument("--promptnet-init", choices=("auto", "unet", "keep"), default="auto",
                   help="PromptNet start: built from the UNet (official), or the model's own; auto = from the UNet "
                        "when the model has no PromptNet (plain SD2 folder or hub id), else keep")
    _train_args(p, steps=OFFICIAL_PRETRAIN_STEPS, batch=8)
    p.set_defaults(handler=cmd_pretrain)

    p = subparsers.add_parser("customize", help="customize PromptNet and the UNet's attention on one photo")
    _model_args(p)
    p.add_argument("--image", required=True, help="photo of the subject")
    p.add_argument("--num-augmentations", type=int, default=31, help="augmented copies of the photo (default 31)")
    p.add_argument("--fill", choices=("border", "reflection", "mean"), default="border",
                   help="simple fill of the area uncovered by an augmentation (without --inpaint-model)")
    p.add_argument("--inpaint-model", default=None,
                   help="diffusers StableDiffusionInpaintPipeline folder (SD2-inpainting): the official augmentation "
                        "(face box, blank areas inpainted); without it, the --fill fallback")
    p.add_argument("--inpaint-prompt", default=None, help="prompt of the inpainting model (default: the notebook's)")
    p.add_argument("--inpaint-negative-prompt", default=None,
                   help="negative prompt of the inpainting model (default: the notebook's)")
    p.add_argument("--inpaint-steps", type=int, default=50, help="inpainting steps (default 50)")
    p.add_argument("--inpaint-guidance", type=float, default=7.5, help="inpainting guidance scale (default 7.5)")
    p.add_argument("--delta-dtype", choices=tuple(PRECISION_DTYPES), default="fp32", help="dtype of the delta file")
    p.add_argument("--no-model", action="store_true", help="write only the delta, not the full model folder")
    p.add_argument("--final-checkpoint", action="store_true", help="also write a checkpoint at the end")
    _train_args(p, steps=100, batch=4)
    p.set_defaults(handler=cmd_customize)

    p = subparsers.add_parser("apply-delta", help="write base model + subject delta as a full model folder")
    _model_args(p)
    p.add_argument("--delta", required=True, help="delta file (subject.delta.safetensors)")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--no-check", action="store_true", help="skip the base-model fingerprint check")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    p.set_defaults(handler=cmd_apply_delta)


def _grad_norm(value: str | None):
    """``--max-grad-norm``: a positive number, or none/off/0 (no clipping)."""

    if str(value).strip().lower() in ("none", "off", "0", "0.0"):
        return None
    try:
        return float(value)
    except ValueError:
        raise InvalidParameterError(f"--max-grad-norm must be a number or 'none', got {value!r}") from None


def _config(args: argparse.Namespace, mode: str):
    """TrainConfig from the checkpoint (when resuming) or the defaults, with the options given on top."""

    base = TrainConfig() if mode == "pretrain" else TrainConfig.customization()
    if args.resume is not None:
        source, state = read_checkpoint_state(args.resume)
        base = TrainConfig.from_dict(state.get("config", {}))
        if base.mode != mode:
            raise CheckpointError(f"{source} is a checkpoint of a {base.mode} run, not of {mode}")
        args.resume = str(source)
    given = {field: getattr(args, arg) for arg, field in _CONFIG_ARGS.items() if getattr(args, arg) is not None}
    if "max_grad_norm" in given:
        given["max_grad_norm"] = _grad_norm(given["max_grad_norm"])
    config = dataclasses.replace(base, **given)
    config.validate()
    return config


def _check_counts(args: argparse.Namespace) -> None:
    for name in ("steps", "checkpoint_every", "keep_checkpoints"):
        value, low = getattr(args, name), 1 if name != "checkpoint_every" else 0
        if value < low:
            raise InvalidParameterError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def _load(args: argparse.Namespace):
    return ProFusionPipeline.load(args.model, args.promptnet, args.device, "fp32", args.weights_seed)


def _load_for_pretraining(args: argparse.Namespace):
    """The model to pre-train: a plain SD2 folder or hub id gets a PromptNet built from its UNet (official
    init); ``--promptnet-init unet`` does that for any model, ``keep`` never."""

    folder = Path(args.model).expanduser()
    plain = args.promptnet is None and (
        (folder.is_dir() and not init.has_promptnet(folder)) or (not folder.exists() and init.is_hub_id(args.model)))
    if plain:
        if args.promptnet_init == "keep":
            raise InvalidParameterError(f"{args.model} has no PromptNet to keep (drop --promptnet-init keep)")
        return init.pipeline_from_sd2(args.model, args.image_encoder, seed=args.weights_seed, device=args.device)
    if args.image_encoder is not None:
        raise InvalidParameterError("--image-encoder is only for a plain SD2 --model (this model has its own)")
    pipe = _load(args)
    if args.promptnet_init == "unet":
        pipe.promptnet = init.promptnet_from_pipeline_unet(pipe, seed=args.weights_seed)
    return pipe


def _summary(result, what: str) -> int:
    train = result.train
    if train.interrupted:
        where = f"checkpoint saved to {train.checkpoint} (continue with --resume {train.checkpoint})" \
            if train.checkpoint else "no checkpoint written"
        print(f"interrupted at step {train.step}; {where}", file=sys.stderr)
        return 130
    window = max(1, min(10, len(train.losses) // 2))
    first, last = train.losses[:window], train.losses[-window:]
    print(f"{what}: {train.step} steps in {train.seconds:.1f} s; loss (mean of {window}) "
          f"{sum(first) / len(first):.4f} -> {sum(last) / len(last):.4f}")
    if result.model_dir is not None:
        print(f"wrote model {result.model_dir}")
    if result.delta_path is not None:
        print(f"wrote delta {result.delta_path} ({result.delta_path.stat().st_size / 1e6:.1f} MB)")
    if train.checkpoint is not None:
        print(f"wrote checkpoint {train.checkpoint}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    _check_counts(args)
    config = _config(args, "pretrain")
    images, subjects = list_images(args.data, args.group_by_subject)
    folder = Path(args.model).expanduser()
    if args.promptnet is None and folder.is_dir() and not (folder / "promptnet").is_dir():

        find_image_encoder(folder, args.image_encoder)  # a plain SD2 folder needs one: fail before writing
    prepare_output_dir(args.out, (MODEL_DIR,), args.overwrite, args.resume is not None)
    pipe = _load_for_pretraining(args)
    dataset = SubjectImageDataset(images, pipe.resolution, subjects=subjects, root=Path(args.data).expanduser())
    result = pretrain(pipe, dataset, args.out, args.steps, config, overwrite=args.overwrite, resume=args.resume,
                      checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
                      progress=not args.no_progress)
    return _summary(result, "pretrain")


def cmd_customize(args: argparse.Namespace) -> int:
    _check_counts(args)
    if args.num_augmentations < 0:
        raise InvalidParameterError(f"--num-augmentations must be >= 0, got {args.num_augmentations}")
    if args.inpaint_steps < 1:
        raise InvalidParameterError(f"--inpaint-steps must be >= 1, got {args.inpaint_steps}")
    config = _config(args, "customize")
    image = load_image(args.image)
    outputs = (DELTA_NAME,) if args.no_model else (MODEL_DIR, DELTA_NAME)
    prepare_output_dir(args.out, outputs, args.overwrite, args.resume is not None)
    inpainter = None
    if args.inpaint_model is not None:

        inpainter = load_inpainter(
            args.inpaint_model, args.device,
            INPAINT_PROMPT if args.inpaint_prompt is None else args.inpaint_prompt,
            INPAINT_NEGATIVE_PROMPT if args.inpaint_negative_prompt is None else args.inpaint_negative_prompt,
            seed=config.seed, num_inference_steps=args.inpaint_steps, guidance_scale=args.inpaint_guidance)
    pipe = _load(args)
    result = customize(
        pipe, image, args.out, args.steps, config, num_augmentations=args.num_augmentations, fill=args.fill,
        inpainter=inpainter, overwrite=args.overwrite, resume=args.resume, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, final_checkpoint=args.final_checkpoint,
        progress=not args.no_progress, delta_dtype=PRECISION_DTYPES[args.delta_dtype],
        save_model=not args.no_model,
    )
    return _summary(result, "customize")


def cmd_apply_delta(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite)):
        raise OutputPathError(f"{out} exists and is not an empty folder (pass --overwrite to replace it)")
    delta = load_delta(args.delta)
    pipe = _load(args)
    apply_delta(pipe, delta, check=not args.no_check)
    pipe.save_pretrained(out, overwrite=args.overwrite)
    print(f"wrote model {out} (base + {len(delta.tensors)} delta tensors)")
    return 0
