"""Typed errors of the training layer (subclasses of :mod:`profusion_rt.core.errors`; the CLI prints them on one
line and exits 2). The delta errors are defined in :mod:`profusion_rt.core.errors` (the runtime and the server
read deltas too) and named here as well."""

from __future__ import annotations

from profusion_rt.core.errors import DeltaError, DeltaMismatchError, InvalidParameterError, ModelLoadError

__all__ = ["CheckpointError", "DatasetError", "DeltaError", "DeltaMismatchError"]


class DatasetError(InvalidParameterError):
    """A training data source is unusable: missing or empty folder, no images in it."""


class CheckpointError(ModelLoadError):
    """A training checkpoint is missing, unreadable, of another format, or made for another run."""
