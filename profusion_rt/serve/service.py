"""The state behind the HTTP app: runtime, scheduler, subject store, metrics, and what each route does.

How a request flows: the handler reads and validates everything it can (body size, image format and
pixels, prompt rules, parameter ranges, subject id) and answers 4xx without touching the model; a valid
request becomes a :class:`Job` in the bounded queue of the :class:`Scheduler` (429 when full), whose single
worker thread owns the runtime. The handler waits for the result up to the request's timeout (504) and
gives the job up when the client disconnects.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from profusion_rt.artifacts.store import model_hash
from profusion_rt.core.errors import InvalidParameterError, ProFusionError
from profusion_rt.core.presets import weights_label
from profusion_rt.models.delta import base_fingerprint
from profusion_rt.serve.config import ServeConfig
from profusion_rt.serve.errors import (
    ClientGone,
    QueueFullError,
    RequestTimeoutError,
    ShuttingDownError,
)
from profusion_rt.serve.requests import (
    check_prompt,
    close_uploads,
    copy_upload,
    decode_image,
    png_bytes,
    read_generate_request,
    read_request,
    upload_bytes,
    validate_subject_fields,
)
from profusion_rt.serve.scheduler import GenerationResult, Job, Scheduler
from profusion_rt.serve.schemas import RequestModels
from profusion_rt.serve.subjects import (
    CustomizationJob,
    Subject,
    SubjectStore,
    check_subject_id,
    load_fitting_delta,
    save_reference,
)
from profusion_rt.training import TrainConfig, customize, save_delta
from profusion_rt.training.delta import extract_delta

logger = logging.getLogger(__name__)

__all__ = ["Server"]


class Server:
    """The state behind the app: runtime, scheduler, subjects, metrics. Build it with :func:`create_app`."""

    def __init__(self, runtime, config: ServeConfig):
        self.runtime, self.config = runtime, config
        self.pipe = runtime.pipe
        fingerprint = base_fingerprint(self.pipe)
        self.base_delta = extract_delta(self.pipe, fingerprint)
        self.model_hash = model_hash(self.pipe)
        self.scheduler = Scheduler(runtime, config.max_queue, config.max_batch, config.max_wait_ms / 1000,
                                   base_delta=self.base_delta)
        self.metrics = self.scheduler.metrics
        self.subjects = SubjectStore(config.data_dir, self.model_hash, fingerprint, config.subject_cache)
        self.models = RequestModels.for_config(config)
        self._customizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="profusion-customize")
        self._stop = threading.Event()
        self.ready = False

    # -- life cycle ----------------------------------------------------------------------------------------
    def start(self) -> None:
        steps = [self.config.warmup_steps] if self.config.warmup_steps else []
        if steps and getattr(self.runtime, "use_cuda_graph", False) and self.config.default_steps not in steps:
            # CUDA graphs are captured per shape (steps included): capture the served default now, so no capture
            # happens later while a customization thread uses the GPU
            steps.append(self.config.default_steps)
        for n in steps:
            start = time.perf_counter()
            self.runtime.warmup(num_inference_steps=n)
            logger.info("warm-up (%d steps): %.2f s", n, time.perf_counter() - start)
        self.scheduler.start()
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        self._stop.set()
        self._customizer.shutdown(wait=True, cancel_futures=True)
        self.scheduler.stop()

    # -- generation ----------------------------------------------------------------------------------------
    async def generate(self, request):
        start = time.perf_counter()
        p, image_data, want_json = await read_generate_request(request, self.config, self.models)
        steps = self.config.default_steps if p.num_inference_steps is None else p.num_inference_steps
        check_prompt(self.pipe.tokenizer, p.prompt, p.class_word, self.config.max_prompt_chars, p.negative_prompt)
        subject = None
        if p.subject_id is not None:
            subject = await run_in_threadpool(self.subjects.load, p.subject_id, self.pipe.device, self.pipe.dtype)
        if image_data is None and (subject is None or subject.reference is None):
            raise InvalidParameterError("give a reference image (file 'image') or the id of a subject stored with one"
                                        if subject is None else
                                        f"subject {subject.id} has no stored reference image; upload one as 'image'")
        kwargs: dict[str, Any] = dict(
            prompt=p.prompt, class_word=p.class_word, negative_prompt=p.negative_prompt,
            num_inference_steps=steps, guidance_scale=p.guidance_scale,
            reference_guidance_scale=p.reference_guidance_scale, fusion_steps=p.fusion_steps,
            fusion_guidance_scale=p.fusion_guidance_scale, fusion_eta=p.fusion_eta,
            fusion_embedding_scale=p.fusion_embedding_scale,
            seed=p.seed if p.seed is not None else secrets.randbelow(2**31),
            num_images_per_prompt=p.num_images, reference_mode=p.reference_mode, output_type="pil")
        if image_data is not None:
            kwargs["reference_image"] = await run_in_threadpool(decode_image, image_data, self.config)
        else:
            kwargs["reference"] = subject.reference
        timeout = min(p.timeout_s or self.config.timeout_s, self.config.timeout_s)
        job = Job(kwargs=kwargs, images=p.num_images, delta_key=subject.id if subject and subject.delta else None,
                  delta=subject.delta if subject else None, deadline=time.monotonic() + timeout)
        result: GenerationResult = await self._wait(request, job, start + timeout - time.perf_counter())
        png_text = {"weights": weights_label(self.pipe)}
        pngs = await run_in_threadpool(lambda: [png_bytes(im, png_text) for im in result.images])
        total_ms = 1000 * (time.perf_counter() - start)
        timings = {"queue_ms": 1000 * result.queue_s, "swap_ms": 1000 * result.swap_s,
                   "prepare_ms": 1000 * result.prepare_s, "loop_ms": 1000 * result.loop_s,
                   "decode_ms": 1000 * result.decode_s, "total_ms": total_ms}
        headers = {
            "X-Request-Id": uuid.uuid4().hex,
            "X-Seed": ",".join(str(s) for s in result.seeds),
            "X-Batch-Size": str(result.batch_images),
            "X-Batch-Requests": str(result.batch_requests),
            "Server-Timing": ", ".join(f"{k[:-3]};dur={v:.1f}" for k, v in timings.items()),
        }
        if subject is not None:
            headers["X-Subject-Id"] = subject.id
        if want_json:
            return JSONResponse({
                "images": [base64.b64encode(b).decode("ascii") for b in pngs], "media_type": "image/png",
                "seeds": result.seeds, "subject_id": subject.id if subject else None,
                "batch_size": result.batch_images, "batch_requests": result.batch_requests,
                "timings": {k: round(v, 3) for k, v in timings.items()},
            }, headers=headers)
        return Response(pngs[0], media_type="image/png", headers=headers)

    async def _wait(self, request, job: Job, timeout: float):
        """Queue ``job`` and wait for it: 504 after ``timeout`` s, given up when the client disconnects."""
        self.scheduler.submit(job)
        waiter = asyncio.wrap_future(job.future)
        deadline = time.monotonic() + max(timeout, 0.0)
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.scheduler.cancel(job)
                    self.metrics.timed_out.inc()
                    raise RequestTimeoutError(f"no answer within {timeout:.1f} s")
                done, _ = await asyncio.wait({waiter}, timeout=min(self.config.poll_interval_s, remaining))
                if done:
                    return waiter.result()
                if await request.is_disconnected():
                    self.scheduler.cancel(job)
                    self.metrics.cancelled.inc()
                    logger.info("client went away; request dropped")
                    raise ClientGone()
        except asyncio.CancelledError:
            self.scheduler.cancel(job)
            raise

    # -- subjects ------------------------------------------------------------------------------------------
    async def create_subject(self, request):
        limit = max(self.config.max_delta_bytes, self.config.max_upload_bytes)
        data, uploads = await read_request(request, limit, self.models.subject_files)
        try:
            p = validate_subject_fields(self.models, data, uploads, self.config)
            steps = p.customize_steps
            image = None
            if "image" in uploads:
                image_data = await upload_bytes(uploads["image"], self.config.max_upload_bytes, "image")
                image = await run_in_threadpool(decode_image, image_data, self.config)
            subject_id = self.subjects.new_id()
            if p.customize:
                job = self._start_customization(subject_id, image, steps, p.reference_mode, p.seed, p.name)
                return json_response({"id": subject_id, "status": job.status, "has_delta": True,
                                      "has_reference": True}, 202)
            with self.subjects.staging(subject_id) as folder:
                delta = None
                if "delta" in uploads:
                    await copy_upload(uploads["delta"], folder / SubjectStore.DELTA, self.config.max_delta_bytes)
                    delta = await run_in_threadpool(load_fitting_delta, folder / SubjectStore.DELTA, self.pipe,
                                                    self.base_delta.base_fingerprint)
                reference = None
                if image is not None:
                    encode = functools.partial(self.pipe.encode_reference, image, mode=p.reference_mode, seed=p.seed)
                    reference = await self._wait(request, Job(task=encode), self.config.timeout_s)
                    save_reference(folder / SubjectStore.REFERENCE, reference, p.reference_mode, p.seed)
                meta = self.subjects.meta(
                    subject_id, "delta" if delta is not None else "image", has_delta=delta is not None,
                    reference={"mode": p.reference_mode, "seed": p.seed} if reference is not None else None,
                    name=p.name)
                self.subjects.write_meta(folder, meta)
        finally:
            await close_uploads(uploads)
        self.subjects.remember(Subject(subject_id, meta, delta, reference))
        self.metrics.subjects_created.inc(1, meta["source"])
        logger.info("stored subject %s (%s)", subject_id, meta["source"])
        return json_response({"id": subject_id, "status": "ready", "has_delta": meta["has_delta"],
                              "has_reference": meta["has_reference"]}, 201)

    def _start_customization(self, subject_id: str, image, steps: int, mode: str, seed: int, name: str | None):
        jobs = list(self.subjects.jobs.values())
        active = [j for j in jobs if j.status in ("queued", "training")]
        if len(active) >= self.config.max_customize_jobs:
            raise QueueFullError(f"{len(active)} customizations are queued or running already; retry later")
        for old in sorted((j for j in jobs if j.status == "failed"), key=lambda j: j.created)[:-100]:
            self.subjects.jobs.pop(old.id, None)  # keep the last 100 failures to report
        job = CustomizationJob(subject_id, "queued", steps)
        self.subjects.jobs[subject_id] = job
        self._customizer.submit(self._customize, job, image, mode, seed, name)
        return job

    def _customize(self, job: CustomizationJob, image, mode: str, seed: int, name: str | None) -> None:
        """Background: customize a base copy of the model on ``image``, then store delta + reference."""
        try:
            copy_job = Job(task=self.scheduler.base_pipeline_copy)
            while True:  # the copy is made on the worker, between batches; wait for room in the queue
                try:
                    self.scheduler.submit(copy_job)
                    break
                except QueueFullError:
                    if self._stop.wait(0.5):
                        raise ShuttingDownError("the server is shutting down") from None
            pipe = copy_job.future.result()
            job.status = "training"

            def progress(trainer, loss):
                job.step = trainer.step
                if self._stop.is_set():
                    raise ShuttingDownError("the server is shutting down")

            start = time.perf_counter()
            result = customize(pipe, image, steps=job.steps, config=TrainConfig.customization(seed=seed),
                               num_augmentations=self.config.customize_augmentations, progress=False,
                               callback=progress)
            reference = pipe.encode_reference(image, mode=mode, seed=seed)
            with self.subjects.staging(job.id) as folder:
                save_delta(folder / SubjectStore.DELTA, pipe, result.base_fingerprint,
                           training={"steps": job.steps, "seed": seed, "server": True})
                save_reference(folder / SubjectStore.REFERENCE, reference, mode, seed)
                meta = self.subjects.meta(job.id, "customized", has_delta=True,
                                          reference={"mode": mode, "seed": seed}, name=name,
                                          customize_steps=job.steps,
                                          customize_seconds=round(time.perf_counter() - start, 3))
                self.subjects.write_meta(folder, meta)
            del pipe
            self.subjects.jobs.pop(job.id, None)
            self.metrics.subjects_created.inc(1, "customized")
            logger.info("customized subject %s in %.1f s", job.id, time.perf_counter() - start)
        except BaseException as exc:  # noqa: BLE001 - recorded in the job's status
            job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, ProFusionError):
                logger.exception("customization of subject %s failed", job.id)

    def subject_status(self, subject_id: str) -> dict[str, Any]:
        check_subject_id(subject_id)
        job = self.subjects.jobs.get(subject_id)
        if job is not None:
            return {"id": subject_id, "status": job.status, "step": job.step, "steps": job.steps, "error": job.error}
        meta = self.subjects.read_meta(subject_id)
        return {"id": subject_id, "status": "ready", **{k: meta.get(k) for k in (
            "source", "created", "name", "has_delta", "has_reference", "reference", "customize_steps")}}

    def health(self) -> dict[str, Any]:
        return {"status": "ok" if self.ready else "starting", "backend": self.runtime.backend,
                "device": str(self.pipe.device), "model_hash": self.model_hash, "resolution": self.pipe.resolution,
                "weights": weights_label(self.pipe),
                "queue_depth": self.scheduler.depth, "max_queue": self.config.max_queue,
                "max_batch": self.config.max_batch, "current_subject": self.scheduler.current_subject}


def json_response(data: dict[str, Any], status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status)

