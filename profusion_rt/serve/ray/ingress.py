"""The HTTP ingress on Ray Serve: the API of ``profusion-rt serve`` (same routes, fields, errors, headers
and metric names), with the generation done by the Generator deployment.

The ingress reads and validates each request with the single-node server's code
(:mod:`profusion_rt.serve.requests`, :mod:`profusion_rt.serve.schemas`, :mod:`profusion_rt.serve.auth`,
the error answers and the metrics middleware of :mod:`profusion_rt.serve.app`) and never touches a model.
A valid generation goes to the Generator with the subject id as the multiplexed model id (``"base"`` when
the subject carries no delta). Ray's answers map to the server's statuses: a full queue
(:class:`~ray.serve.exceptions.BackPressureError`) is 429 with ``Retry-After``; a replica that died
(:class:`~ray.exceptions.RayActorError`) is 503 with ``Retry-After``; the request's timeout is 504.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from typing import Any

import ray
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from starlette.concurrency import run_in_threadpool

from profusion_rt.core.errors import ProFusionError
from profusion_rt.serve.app import build_app
from profusion_rt.serve.config import ServeConfig
from profusion_rt.serve.errors import (
    QueueFullError,
    RequestTimeoutError,
    ShuttingDownError,
)
from profusion_rt.serve.metrics import Metrics
from profusion_rt.serve.ray.customize import customize_subject, subject_meta
from profusion_rt.serve.ray.generator import BASE
from profusion_rt.serve.ray.spec import ScaleSpec, config_from_dict, config_to_dict
from profusion_rt.serve.requests import (
    close_uploads,
    read_generate_request,
    read_request,
    upload_bytes,
    validate_subject_fields,
)
from profusion_rt.serve.schemas import (
    RequestModels,
)
from profusion_rt.serve.service import json_response
from profusion_rt.serve.storage import SubjectStorage
from profusion_rt.serve.subjects import SubjectStore, check_subject_id

logger = logging.getLogger(__name__)

__all__ = ["Ingress", "RayFrontend", "ReplicaGone", "create_ray_app"]


class ReplicaGone(ShuttingDownError):
    """The replica running the request died (503); the request may be sent again."""

    retry_after_s = 1  # the answer's Retry-After


class RayFrontend:
    """The state behind the ingress app: the Generator handle, the shared storage, the metrics."""

    def __init__(self, generator, config: ServeConfig, data: str, spec: dict[str, Any], scale: ScaleSpec):
        self.generator, self.config, self.spec, self.scale = generator, config, spec, scale
        self.storage = SubjectStorage(data)
        self.data = data
        self.models = RequestModels.for_config(config)
        self.metrics = Metrics(lambda: 0)
        self._tasks: set = set()

    async def call(self, method: str, model_id: str, *args, timeout: float):
        """A Generator method through the handle: Ray's failures as the server's typed errors."""
        response = getattr(self.generator.options(multiplexed_model_id=model_id), method).remote(*args)
        try:
            return await asyncio.wait_for(response, timeout)
        except asyncio.TimeoutError:
            response.cancel()
            self.metrics.timed_out.inc()
            raise RequestTimeoutError(f"no answer within {timeout:.1f} s") from None
        except BackPressureError:
            self.metrics.rejected.inc()
            raise QueueFullError("every replica's queue is full; retry later") from None
        except RayActorError as exc:
            self.metrics.failed.inc(1, "ReplicaGone")
            logger.warning("a Generator replica died during a request: %s", str(exc).splitlines()[0])
            raise ReplicaGone("the replica serving this request stopped; retry") from None
        except RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else None
            if isinstance(cause, ProFusionError):
                raise cause from None
            logger.error("Generator failed: %s", exc)
            raise ProFusionError(f"internal error: {type(cause).__name__ if cause else 'RayTaskError'}") from None

    async def model_id_of(self, subject_id: str | None) -> str:
        if subject_id is None:
            return BASE
        check_subject_id(subject_id)
        job = await run_in_threadpool(self.storage.get_job, subject_id)
        if job is not None:  # still customizing, or failed: the Generator answers 409 with the details
            return subject_id
        meta = await run_in_threadpool(self.storage.read_meta, subject_id)  # 404 here, before any replica
        return subject_id if meta.get("has_delta") else BASE

    async def generate(self, request):
        start = time.perf_counter()
        p, image, want_json = await read_generate_request(request, self.config, self.models)
        model_id = await self.model_id_of(p.subject_id)
        timeout = min(p.timeout_s or self.config.timeout_s, self.config.timeout_s)
        fields = p.model_dump()
        result = await self.call("generate", model_id, fields, image, timeout=timeout)
        self._observe(result)
        total_ms = 1000 * (time.perf_counter() - start)
        timings = {"queue_ms": 1000 * result["queue_s"], "swap_ms": 1000 * result["swap_s"],
                   "prepare_ms": 1000 * result["prepare_s"], "loop_ms": 1000 * result["loop_s"],
                   "decode_ms": 1000 * result["decode_s"], "total_ms": total_ms}
        headers = {
            "X-Request-Id": uuid.uuid4().hex,
            "X-Seed": ",".join(str(s) for s in result["seeds"]),
            "X-Batch-Size": str(result["batch_images"]),
            "X-Batch-Requests": str(result["batch_requests"]),
            "X-Batch-Id": result["batch_id"],
            "X-Replica": result["replica"],
            "Server-Timing": ", ".join(f"{k[:-3]};dur={v:.1f}" for k, v in timings.items()),
        }
        if p.subject_id is not None:
            headers["X-Subject-Id"] = p.subject_id
        if want_json:
            return JSONResponse({
                "images": [base64.b64encode(b).decode("ascii") for b in result["pngs"]], "media_type": "image/png",
                "seeds": result["seeds"], "subject_id": p.subject_id,
                "batch_size": result["batch_images"], "batch_requests": result["batch_requests"],
                "timings": {k: round(v, 3) for k, v in timings.items()},
            }, headers=headers)
        return Response(result["pngs"][0], media_type="image/png", headers=headers)

    def _observe(self, result: dict[str, Any]) -> None:
        m = self.metrics
        m.images.inc(len(result["seeds"]))
        m.queue_wait.observe(result["queue_s"])
        if result["first_of_batch"]:  # one request of each batch carries the batch's figures
            m.batch_size.observe(result["batch_images"])
            m.batch_requests.observe(result["batch_requests"])
            for stage in ("swap", "prepare", "loop", "decode"):
                m.stage_seconds.inc(result[f"{stage}_s"], stage)
        if result["swapped"]:
            m.delta_swaps.inc()

    async def create_subject(self, request):
        limit = max(self.config.max_delta_bytes, self.config.max_upload_bytes)
        data, uploads = await read_request(request, limit, self.models.subject_files)
        try:
            p = validate_subject_fields(self.models, data, uploads, self.config)
            image = await upload_bytes(uploads["image"], self.config.max_upload_bytes, "image") \
                if "image" in uploads else None
            delta = await upload_bytes(uploads["delta"], self.config.max_delta_bytes, "delta") \
                if "delta" in uploads else None
        finally:
            await close_uploads(uploads)
        subject_id = SubjectStore.new_id()
        if p.customize:
            return await self._start_customization(subject_id, image, p)
        meta = subject_meta(subject_id, "delta" if delta is not None else "image", has_delta=delta is not None,
                            reference={"mode": p.reference_mode, "seed": p.seed} if image is not None else None,
                            name=p.name)
        meta = await self.call("store_subject", BASE, subject_id, meta, delta, image, p.reference_mode, p.seed,
                               timeout=self.config.timeout_s)
        self.metrics.subjects_created.inc(1, meta["source"])
        logger.info("stored subject %s (%s)", subject_id, meta["source"])
        return json_response({"id": subject_id, "status": "ready", "has_delta": meta["has_delta"],
                              "has_reference": meta["has_reference"]}, 201)

    async def _start_customization(self, subject_id: str, image: bytes, p):
        jobs = await run_in_threadpool(self.storage.jobs)
        active = [j for j in jobs if j.get("status") in ("queued", "training")]
        if len(active) >= self.config.max_customize_jobs:
            raise QueueFullError(f"{len(active)} customizations are queued or running already; retry later")
        job = {"id": subject_id, "status": "queued", "step": 0, "steps": p.customize_steps, "error": None,
               "created": time.time()}
        await run_in_threadpool(self.storage.put_job, subject_id, job)
        ref = customize_subject.options(num_cpus=self.scale.customize_num_cpus,
                                        num_gpus=self.scale.customize_num_gpus).remote(
            self.spec, config_to_dict(self.config), self.data, subject_id, image, p.customize_steps,
            p.reference_mode, p.seed, p.name)
        self._tasks.add(ref)
        self._tasks = {r for r in self._tasks if not _done(r)}
        return json_response({"id": subject_id, "status": "queued", "has_delta": True, "has_reference": True}, 202)

    async def subject_status(self, subject_id: str) -> dict[str, Any]:
        return await run_in_threadpool(self._subject_status, subject_id)

    async def delete_subject(self, subject_id: str) -> None:
        await run_in_threadpool(self.storage.delete, subject_id)

    def _subject_status(self, subject_id: str) -> dict[str, Any]:
        check_subject_id(subject_id)
        job = self.storage.get_job(subject_id)
        if job is not None and not self.storage.exists(subject_id):
            return {"id": subject_id, "status": job.get("status"), "step": job.get("step"),
                    "steps": job.get("steps"), "error": job.get("error")}
        meta = self.storage.read_meta(subject_id)
        return {"id": subject_id, "status": "ready", **{k: meta.get(k) for k in (
            "source", "created", "name", "has_delta", "has_reference", "reference", "customize_steps")}}

    async def health(self) -> tuple[dict[str, Any], bool]:
        try:
            info = await self.call("info", BASE, timeout=10.0)
        except ProFusionError as exc:
            return {"status": "starting", "engine": "ray", "error": str(exc)}, False
        return {"status": "ok", "engine": "ray", **{k: info[k] for k in (
            "backend", "device", "model_hash", "resolution", "weights")},
            "max_batch": self.config.max_batch, "max_queue": self.config.max_queue}, True


def _done(ref) -> bool:
    ready, _ = ray.wait([ref], timeout=0)
    return bool(ready)


def create_ray_app(frontend: RayFrontend) -> FastAPI:
    """The FastAPI app of the ingress: the routes of :func:`profusion_rt.serve.app.build_app` over the Ray
    frontend."""
    return build_app(frontend, "ProFusion customized text-to-image generation on Ray Serve.")


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """The HTTP ingress deployment: each replica builds its app (:func:`create_ray_app`) at start-up."""

    def __init__(self, generator, spec: dict[str, Any], scale: dict[str, Any], config_values: dict[str, Any],
                 data: str):
        self.frontend = RayFrontend(generator, config_from_dict(config_values), data, spec, ScaleSpec(**scale))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_ray_app(self.frontend)
