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

__version__ = "0.1.0"

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


def __getattr__(name: str):
    # Importing the pipeline pulls in torch and diffusers: do it lazily.
    if name == "ProFusionPipeline":
        from profusion_rt.pipeline import ProFusionPipeline

        return ProFusionPipeline
    raise AttributeError(name)
