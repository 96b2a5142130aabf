"""The FastAPI app: routes, error answers, metrics and authentication middleware, the OpenAPI description.

* ``POST /v1/generate``: a reference image (multipart file ``image``, or ``image_base64`` in a JSON body)
  and/or a stored ``subject_id``, a ``prompt`` with ``{S*}`` and sampling parameters -> a PNG with the seed,
  the batch size and the timings in headers; with ``?format=json`` (or ``Accept: application/json``) a JSON
  document with base64 PNGs instead;
* ``POST /v1/subjects``: store a customization ``delta`` (``profusion-rt customize`` output) and/or a
  reference ``image`` (with ``customize=true`` the server first customizes the model on it in the
  background) -> a server-generated id; ``GET``/``DELETE /v1/subjects/{subject_id}``;
* ``GET /healthz``, ``GET /metrics`` (Prometheus text format), ``GET /docs`` and ``GET /openapi.json``.

The request bodies are declared in ``/openapi.json`` from the models that validate them
(:mod:`profusion_rt.serve.schemas`); the handlers read the body themselves (:mod:`profusion_rt.serve.requests`)
to keep the byte limit while it streams in and to take multipart, url-encoded and JSON bodies alike.
"""

import functools
import logging
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any, Optional

from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from profusion_rt.core.errors import InvalidParameterError, ProFusionError
from profusion_rt.serve.auth import AuthMiddleware, load_api_keys
from profusion_rt.serve.config import ServeConfig
from profusion_rt.serve.errors import ClientGone, QueueFullError, error_body, http_status
from profusion_rt.serve.metrics import CONTENT_TYPE, Metrics
from profusion_rt.serve.schemas import SUBJECT_ID_PATTERN, ErrorBody, GenerateResponse, request_body
from profusion_rt.serve.service import Server, json_response

logger = logging.getLogger(__name__)

__all__ = ["LocalFrontend", "build_app", "create_app", "error_response"]

ROUTES = ("/v1/generate", "/v1/subjects", "/healthz", "/metrics")

SubjectId = Annotated[str, Path(description="a subject id returned by POST /v1/subjects: 32 lower-case hex digits "
                                "(anything else is an unknown subject, 404)", examples=["3f0c" + "0" * 28],
                                json_schema_extra={"pattern": SUBJECT_ID_PATTERN})]


def error_response(exc: ProFusionError, status: Optional[int] = None,
                   headers: Optional[dict[str, str]] = None) -> JSONResponse:
    return JSONResponse(error_body(exc), status_code=status or http_status(exc), headers=headers)


def _route_label(path: str) -> str:
    for prefix in ROUTES:
        if path == prefix or path.startswith(prefix + "/"):
            return prefix
    return "other"


class MetricsMiddleware:
    """Counts every HTTP response by route and status, and times it (until the response starts)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route, status = _route_label(scope.get("path", "")), [500]
        start = time.perf_counter()

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                self.metrics.latency.observe(time.perf_counter() - start, route)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.inc(1, route, str(status[0]))


def guarded(fn):
    """Every error of a handler as the JSON error answer: typed errors with their status, 429 with
    ``Retry-After``, a client that went away as 499, anything else logged and answered 500."""

    @functools.wraps(fn)  # FastAPI reads the handler's own parameters through __wrapped__
    async def endpoint(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except ClientGone:
            return Response(status_code=499)
        except QueueFullError as exc:
            return error_response(exc, headers={"Retry-After": "1"})
        except ProFusionError as exc:
            if http_status(exc) >= 500:
                logger.error("%s: %s", type(exc).__name__, exc)
            retry = getattr(exc, "retry_after_s", None)  # e.g. a replica that died: the request may be resent
            return error_response(exc, headers={"Retry-After": str(retry)} if retry else None)
        except Exception:  # a bug: log it, answer JSON
            request = kwargs.get("request")
            logger.exception("unhandled error on %s", request.url.path if request is not None else fn.__name__)
            return error_response(ProFusionError("internal server error"), 500)

    return endpoint


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody} for status in statuses}


class LocalFrontend:
    """The single-node :class:`Server` behind the routes of :func:`build_app`."""

    def __init__(self, server: Server):
        self.server, self.config, self.models, self.metrics = server, server.config, server.models, server.metrics

    async def generate(self, request: Request):
        return await self.server.generate(request)

    async def create_subject(self, request: Request):
        return await self.server.create_subject(request)

    async def subject_status(self, subject_id: str) -> dict[str, Any]:
        return self.server.subject_status(subject_id)

    async def delete_subject(self, subject_id: str) -> None:
        await run_in_threadpool(self.server.subjects.delete, subject_id)

    async def health(self) -> tuple[dict[str, Any], bool]:
        return self.server.health(), self.server.ready


def create_app(runtime, config: Optional[ServeConfig] = None) -> FastAPI:
    """The FastAPI app serving ``runtime``. Start-up (the app's lifespan) warms the runtime and starts the
    worker; shutdown stops it and puts the base weights back. ``app.state.server`` is the :class:`Server`.
    With ``config.api_keys_file`` the ``/v1/*`` routes (and ``/metrics`` with ``metrics_need_key``) need a
    bearer key (:mod:`profusion_rt.serve.auth`)."""
    server = Server(runtime, config or ServeConfig())

    @asynccontextmanager
    async def lifespan(app):
        await run_in_threadpool(server.start)
        try:
            yield
        finally:
            await run_in_threadpool(server.stop)

    app = build_app(LocalFrontend(server), "ProFusion customized text-to-image generation.", lifespan=lifespan)
    app.state.server = server
    return app


def build_app(frontend, description: str, lifespan=None) -> FastAPI:
    """The routes, error answers, authentication and metrics of the HTTP API over ``frontend`` (the
    single-node :class:`LocalFrontend` or the Ray ingress's frontend): an object with ``config``, ``models``,
    ``metrics`` and the async methods ``generate(request)``, ``create_subject(request)``,
    ``subject_status(id)``, ``delete_subject(id)`` and ``health() -> (body, ready)``."""
    config = frontend.config
    keys = load_api_keys(config.api_keys_file) if config.api_keys_file is not None else None
    app = FastAPI(title="profusion-rt", version="1", lifespan=lifespan,
                  description=description + ' Errors are JSON `{"error": {"type": ..., "message": ...}}`.' +
                  (" The /v1 routes need `Authorization: Bearer <key>`." if keys else ""))
    app.state.frontend = frontend
    models = frontend.models

    generate_doc = {
        "requestBody": request_body(models.generate, models.generate_files),
        "responses": {"200": {"description": "one PNG (the default) or, with ?format=json, the JSON document",
                              "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}},
    }

    @app.post("/v1/generate", summary="generate an image of a subject", openapi_extra=generate_doc,
              response_model=GenerateResponse, responses=_errors(400, 401, 404, 409, 413, 415, 422, 429, 503, 504))
    @guarded
    async def generate(request: Request, format: Annotated[Optional[str], Query(
            description="json: answer with the JSON document (also with Accept: application/json)")] = None):
        return await frontend.generate(request)

    @app.post("/v1/subjects", summary="store a subject (delta and/or reference image), or customize one",
              status_code=201, responses=_errors(400, 401, 413, 415, 422, 429),
              openapi_extra={"requestBody": request_body(models.subjects, models.subject_files)})
    @guarded
    async def create_subject(request: Request):
        return await frontend.create_subject(request)

    @app.get("/v1/subjects/{subject_id}", summary="a subject's status", responses=_errors(401, 404))
    @guarded
    async def get_subject(subject_id: SubjectId):
        return json_response(await frontend.subject_status(subject_id))

    @app.delete("/v1/subjects/{subject_id}", summary="delete a subject", responses=_errors(401, 404))
    @guarded
    async def delete_subject(subject_id: SubjectId):
        await frontend.delete_subject(subject_id)
        return json_response({"id": subject_id, "status": "deleted"})

    @app.get("/healthz", summary="liveness and readiness (200 once ready to serve, 503 before)")
    async def healthz():
        body, ready = await frontend.health()
        return json_response(body, 200 if ready else 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(frontend.metrics.render(), media_type=CONTENT_TYPE)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # unknown routes, wrong methods
        name = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        return json_response({"error": {"type": name, "message": str(exc.detail)}}, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):  # a declared parameter (query, path) of the wrong type
        first = (exc.errors() or [{}])[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return error_response(InvalidParameterError(f"{where}: {first.get('msg', 'invalid value')}"))

    if keys is not None:
        _document_security(app, protect_metrics=config.metrics_need_key)
        app.add_middleware(AuthMiddleware, keys=keys, protect_metrics=config.metrics_need_key,
                           on_refused=frontend.metrics.unauthorized.inc)
    app.add_middleware(MetricsMiddleware, metrics=frontend.metrics)  # outermost: counts 401s too
    return app


def _document_security(app: FastAPI, protect_metrics: bool) -> None:
    """Declare the bearer scheme in ``/openapi.json`` (``/docs`` then has an Authorize button)."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = plain()
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
                "type": "http", "scheme": "bearer", "description": "one of the keys of --api-keys-file"}
            for path, operations in schema.get("paths", {}).items():
                if path.startswith("/v1/") or (protect_metrics and path == "/metrics"):
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
