"""Pipelines for benchmarking: a preset's random-weight pipeline, optionally at another resolution, built
directly on a CUDA device when one is used (an SD2-base build on the CPU takes minutes per process)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from profusion_rt.core.dtypes import PRECISION_DTYPES
from profusion_rt.core.errors import InvalidParameterError
from profusion_rt.core.presets import get_preset
from profusion_rt.models import factory
from profusion_rt.models.factory import build_components
from profusion_rt.pipeline import ProFusionPipeline


def preset_at_resolution(name: str, resolution: int | None = None):
    """The preset ``name``, or a copy of it at ``resolution`` px.

    Every network keeps its structure; the sample sizes follow the resolution, and PromptNet's output
    conv gets kernel = stride = (latent side / region kernel) so that its token head still collapses to ONE
    token S* (the release's 8 for SD2-base at 512 px, the tiny preset's 4 at 256 px). Resolutions must be
    multiples of 8 x the region kernel (64 px for both presets)."""

    preset = get_preset(name)
    if resolution is None or int(resolution) == preset.resolution:
        return preset
    resolution = int(resolution)
    factor = preset.vae_scale_factor
    k = int(preset.promptnet["region_kernel_size"])
    if resolution % (factor * k) != 0:
        raise InvalidParameterError(f"resolution {resolution} must be a multiple of {factor * k} px for {name}")
    latent = resolution // factor
    unet = dict(preset.unet, sample_size=latent)
    vae = dict(preset.vae, sample_size=resolution)
    promptnet = dict(preset.promptnet, sample_size=latent, region_output_kernel_size=latent // k)
    return dataclasses.replace(preset, resolution=resolution, unet=unet, vae=vae, promptnet=promptnet)


def build_pipeline(model: str = "tiny", device: str = "cpu", dtype: str = "fp32", seed: int = 0,
                   resolution: int | None = None):
    """A pipeline of preset ``model`` (or a model folder) with random weights from ``seed``.

    On the CPU at the preset's own resolution this is exactly ``ProFusionPipeline.from_preset`` (the same
    weights as the demo and the tests). On CUDA every network is initialised on the device (same seed, so
    every benchmark process of one run gets the same weights), then cast to ``dtype``."""
    import torch

    dev = torch.device(device)
    if Path(model).is_dir():
        if resolution is not None:

            raise InvalidParameterError("a resolution override needs a preset, not a model folder")
        return ProFusionPipeline.load(model, None, device, dtype, seed)
    preset = preset_at_resolution(model, resolution)
    components = factory.build_components(preset, seed=seed, device=dev)  # on CUDA: initialised there
    pipe = ProFusionPipeline.from_components(components, resolution=preset.resolution, preset=preset.name)
    pipe.to(dev, PRECISION_DTYPES[dtype])
    pipe.progress_bar = False
    return pipe


def meta_components(model: str = "tiny", resolution: int | None = None):
    """The preset's components on the meta device (shapes only), for FLOP counting; None for a folder."""

    if Path(model).is_dir():
        return None
    preset = preset_at_resolution(model, resolution)
    return build_components(preset, device="meta"), preset.resolution
