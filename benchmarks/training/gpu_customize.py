"""Prepared GPU check (not a test) of the paper's claim that customization takes "within half a minute on a
single GPU": the default customization at SD2-base shapes with random weights.

What it runs: the tiny-preset code path at ``sd2-base`` shapes (UNet 866 M, PromptNet 408 M, OpenCLIP
ViT-H text and vision towers, SD VAE) built directly on the GPU from a seed; a synthetic 512 px photo + 31
augmentations (border fill); 100 iterations at batch 4, 512 px, bf16 autocast over float32 weights,
gradient checkpointing, AdamW on PromptNet + the UNet's attention q/k/v (483 M trainable values). Prints the
GPU name, the time of the 100 iterations (and of the first one, which includes kernel selection), the time
of the whole customization without the model build, and the peak GPU memory.

Without CUDA it prints a message and exits 0. ``--budget-s`` stops the iterations early (and extrapolates)
if they would not fit the lent machine's time.

On a GPU machine without diffusers: install its wheels first (``benchmarks/README.md``, "The GPU run"),
then run ``python -m profusion_rt.benchmarks.training.gpu_customize``.
"""

from __future__ import annotations

import argparse
import sys
import time

from profusion_rt.pipeline import ProFusionPipeline
from profusion_rt.training import (
    SubjectImageDataset,
    TrainConfig,
    Trainer,
    customization_images,
)
from profusion_rt.training.data import derive_seed


def synthetic_photo(size: int = 512):
    """A deterministic RGB test image with smooth gradients and a few shapes (no data files needed)."""
    import numpy as np
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([0.5 + 0.5 * np.sin(6 * x), 0.5 + 0.5 * np.cos(4 * y), 0.5 + 0.25 * np.sin(5 * (x + y))], -1)
    image = Image.fromarray((rgb * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((150, 100, 360, 380), fill=(220, 180, 150))
    draw.rectangle((200, 380, 310, 500), fill=(60, 60, 140))
    return image


def main() -> int:
    parser = argparse.ArgumentParser(description="customization timing at SD2-base shapes on a GPU")
    parser.add_argument("--preset", default="sd2-base")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop the iterations after this long")
    parser.add_argument("--device", default="cuda", help="cpu only to dry-run the script (--preset tiny)")
    args = parser.parse_args()

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA GPU available (this script times customization on a GPU)")
        return 0

    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"device: {name}; torch {torch.__version__}")

    start = time.perf_counter()

    pipe = ProFusionPipeline.from_preset(args.preset, seed=0, device=device)  # initialised on the GPU
    sync()
    print(f"{args.preset} built on {device} in {time.perf_counter() - start:.1f} s (not counted)")

    config = TrainConfig.customization(batch_size=args.batch_size, precision=args.precision,
                                       gradient_checkpointing=not args.no_gradient_checkpointing)
    job_start = time.perf_counter()
    images = customization_images(synthetic_photo(), pipe.resolution, 31, derive_seed(config.seed, "augment"))
    augment_s = time.perf_counter() - job_start
    dataset = SubjectImageDataset(images, pipe.resolution, subjects=["subject"] * len(images))
    setup_start = time.perf_counter()
    trainer = Trainer(pipe, dataset, config)
    sync()
    setup_s = time.perf_counter() - setup_start
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    train_start = time.perf_counter()
    first_s = None
    for step in range(args.steps):
        loss = trainer.train_step()  # float(loss) synchronises every step
        if first_s is None:
            first_s = time.perf_counter() - train_start
        if time.perf_counter() - train_start > args.budget_s:
            print(f"time budget reached after {step + 1} iterations")
            break
    done = trainer.step
    train_s = time.perf_counter() - train_start
    total_s = time.perf_counter() - job_start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    steady = (train_s - first_s) / max(done - 1, 1)
    estimate = train_s if done == args.steps else first_s + steady * (args.steps - 1)
    print(f"augmentations {augment_s:.1f} s, setup (fingerprint, encode 32 images) {setup_s:.1f} s")
    print(f"{done} iterations, batch {args.batch_size}, {pipe.resolution} px, {args.precision} autocast, "
          f"gradient checkpointing {'off' if args.no_gradient_checkpointing else 'on'}: {train_s:.1f} s "
          f"(first {first_s:.2f} s, then {steady:.3f} s each); last loss {loss:.4f}")
    print(f"RESULT gpu={name!r} iterations_s={estimate:.1f} customization_s={total_s:.1f} "
          f"peak_memory_gib={peak:.1f} claim_30s={'met' if estimate <= 30 else 'missed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
