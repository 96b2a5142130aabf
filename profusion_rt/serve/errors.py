"""Errors of the server and their HTTP statuses.

Each :class:`ServeError` carries its own status; every other
:class:`~profusion_rt.core.errors.ProFusionError` is mapped by :func:`http_status`. Every error answer is
the JSON document ``{"error": {"type": <class name>, "message": <one line>}}`` (:func:`error_body`).
"""

from __future__ import annotations

from typing import Any

from profusion_rt.core.errors import (BackendUnavailableError, ImageError, InvalidParameterError, ModelLoadError,
                                      OutputPathError, ProFusionError, PromptError)

__all__ = [
    "BadRequestError", "ClientGone", "PayloadTooLargeError", "QueueFullError", "RequestTimeoutError", "ServeError",
    "ShuttingDownError", "SubjectNotReadyError", "UnauthorizedError", "UnknownSubjectError", "UnsupportedMediaError",
    "error_body", "http_status",
]


class ServeError(ProFusionError):
    status = 400


class BadRequestError(ServeError, InvalidParameterError):
    """The body is not a well-formed multipart or JSON request."""


class UnauthorizedError(ServeError):
    """No API key, or not one of the server's (``--api-keys-file``)."""

    status = 401


class PayloadTooLargeError(ServeError):
    """The body, or the image's pixel count, is over the server's limit."""

    status = 413


class UnsupportedMediaError(ServeError, ImageError):
    """The upload is not an image in one of the accepted formats."""

    status = 415


class UnknownSubjectError(ServeError, KeyError):
    status = 404

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class SubjectNotReadyError(ServeError):
    """The subject is still being customized, its customization failed, or it was made for another model."""

    status = 409


class QueueFullError(ServeError):
    status = 429


class RequestTimeoutError(ServeError):
    status = 504


class ShuttingDownError(ServeError):
    status = 503


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def http_status(exc: ProFusionError) -> int:
    """The HTTP status of a typed error: 4xx for what the request got wrong, 5xx for the server's side."""
    if isinstance(exc, ServeError):
        return exc.status
    if isinstance(exc, (PromptError, InvalidParameterError)):
        return 422
    if isinstance(exc, ImageError):
        return 400
    if isinstance(exc, ModelLoadError):  # an uploaded delta that is not one, or made for another model
        return 422
    if isinstance(exc, BackendUnavailableError):
        return 503
    if isinstance(exc, OutputPathError):
        return 500
    return 400


def error_body(exc: BaseException, type_name: str | None = None) -> dict[str, Any]:
    """The JSON document of an error answer."""
    return {"error": {"type": type_name or type(exc).__name__, "message": str(exc)}}
