"""profusion-rt: an optimized inference runtime for ProFusion (customized text-to-image on Stable Diffusion 2)."""

from profusion_rt.core.errors import (
    BackendUnavailableError,
    ImageError,
    InvalidParameterError,
    ModelLoadError,
    OutputPathError,
    ProFusionError,
    PromptError,
    UnknownPresetError,
)
from profusion_rt.pipeline import ProFusionPipeline

__version__ = "0.2.0"

__all__ = [
    "ProFusionPipeline",
    "ProFusionError",
    "InvalidParameterError",
    "PromptError",
    "ImageError",
    "UnknownPresetError",
    "ModelLoadError",
    "OutputPathError",
    "BackendUnavailableError",
    "__version__",
]

