"""Typed errors of profusion-rt.

Every error a user can cause derives from :class:`ProFusionError`; the CLI prints its message on one line
and exits non-zero without a traceback. Messages are a single line that says what was wrong and, where
it helps, what would be right.
"""

from __future__ import annotations


class ProFusionError(Exception):
    """Base class of all errors caused by input, configuration or files (not by bugs)."""

    exit_code = 2


class InvalidParameterError(ProFusionError, ValueError):
    """A sampling, training or export parameter is out of range or of the wrong kind."""


class PromptError(ProFusionError, ValueError):
    """The prompt is malformed: placeholder rules broken, or longer than the text encoder accepts."""


class ImageError(ProFusionError, ValueError):
    """An image file or array could not be used (unreadable, truncated, not an image, zero size)."""


class UnknownPresetError(ProFusionError, KeyError):
    """A preset name that is not defined."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelLoadError(ProFusionError, OSError):
    """A model folder or weight file is missing, incomplete or inconsistent."""


class OutputPathError(ProFusionError, OSError):
    """An output location cannot be written."""


class DeltaError(ModelLoadError):
    """A subject delta file is missing, unreadable or not a profusion-rt delta."""


class DeltaMismatchError(DeltaError):
    """A subject delta was made for another base model (fingerprint, tensor names or shapes differ)."""


class BackendUnavailableError(ProFusionError, RuntimeError):
    """A requested backend (TensorRT, a CUDA provider, a GPU) is not available on this machine."""


class EngineError(ProFusionError, RuntimeError):
    """An inference engine refused its inputs or failed: a tensor of the wrong dtype, a misaligned address,
    a shape outside the engine's profile, an incomplete or failed weight refit."""


class NonFiniteError(ProFusionError, FloatingPointError):
    """A latent or image holds NaN or Inf (typically fp16 overflow); ``stage`` names where it appeared:
    "fusion stage", "refinement stage", "latents after the loop" or "VAE decode". Never returned as an image."""

    def __init__(self, message: str, stage: str = ""):
        super().__init__(message)
        self.stage = stage
