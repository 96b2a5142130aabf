"""Typed errors of the training layer (subclasses of :mod:`profusion_rt.core.errors`; the CLI prints them on one
line and exits 2)."""

from __future__ import annotations

from profusion_rt.core.errors import InvalidParameterError, ModelLoadError


class DatasetError(InvalidParameterError):
    """A training data source is unusable: missing or empty folder, no images in it."""


class CheckpointError(ModelLoadError):
    """A training checkpoint is missing, unreadable, of another format, or made for another run."""


class DeltaError(ModelLoadError):
    """A delta file is missing, unreadable or not a profusion-rt delta."""


class DeltaMismatchError(DeltaError):
    """A delta was made for another base model (fingerprint, tensor names or shapes differ)."""
