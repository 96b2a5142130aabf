"""HTTP serving of a :class:`~profusion_rt.runtime.Runtime`: FastAPI on uvicorn, one worker thread, dynamic
batching, stored subjects, Prometheus metrics, optional bearer-token authentication (docs/serving.md).

Modules, lowest first:

* :mod:`~profusion_rt.serve.errors`: the errors and their HTTP statuses;
* :mod:`~profusion_rt.serve.config`: :class:`ServeConfig`, the one place for the server's defaults (the
  ``profusion-rt serve`` options are derived from it);
* :mod:`~profusion_rt.serve.metrics`: the Prometheus metrics (``prometheus_client``);
* :mod:`~profusion_rt.serve.scheduler`: the bounded queue and the batching worker (:class:`Scheduler`, :class:`Job`);
* :mod:`~profusion_rt.serve.subjects`: the subject store on disk;
* :mod:`~profusion_rt.serve.schemas`: the declared request models (pydantic), also in ``/openapi.json``;
* :mod:`~profusion_rt.serve.requests`: reading a request's body, image and prompt;
* :mod:`~profusion_rt.serve.auth`: API keys;
* :mod:`~profusion_rt.serve.service`: :class:`Server`, the state behind the app;
* :mod:`~profusion_rt.serve.app`: :func:`create_app`, the FastAPI app;
* :mod:`~profusion_rt.serve.server`: :class:`BackgroundServer` (uvicorn on a thread);
* :mod:`~profusion_rt.serve.cli`: ``profusion-rt serve``; :mod:`~profusion_rt.serve.load`: the load check.

The names below are importable from ``profusion_rt.serve``; those whose module needs the ``serve`` extra
(fastapi, uvicorn, prometheus-client) are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from profusion_rt.serve.config import ServeConfig
from profusion_rt.serve.errors import (BadRequestError, PayloadTooLargeError, QueueFullError, RequestTimeoutError,
                                       ServeError, ShuttingDownError, SubjectNotReadyError, UnauthorizedError,
                                       UnknownSubjectError, UnsupportedMediaError, http_status)

#: name -> module that defines it (imported on first access: they need the serve extra)
_LAZY = {
    "Metrics": "metrics",
    "GenerationResult": "scheduler", "Job": "scheduler", "Scheduler": "scheduler",
    "Subject": "subjects", "SubjectStore": "subjects", "check_subject_id": "subjects",
    "Server": "service",
    "create_app": "app",
    "BackgroundServer": "server",
    "load_api_keys": "auth",
}

__all__ = ["BadRequestError", "PayloadTooLargeError", "QueueFullError", "RequestTimeoutError", "ServeConfig",
           "ServeError", "ShuttingDownError", "SubjectNotReadyError", "UnauthorizedError", "UnknownSubjectError",
           "UnsupportedMediaError", "http_status", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'profusion_rt.serve' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"profusion_rt.serve.{module}"), name)
    globals()[name] = value
    return value
