"""The Generator deployment: one runtime per replica, subject deltas multiplexed, requests batched.

* built like ``profusion-rt serve`` builds its runtime (:meth:`ProFusionPipeline.load`, :func:`create_runtime`)
  and warmed up in the constructor, so Ray Serve routes to a replica only once it is ready;
* ``load_subject`` is ``@serve.multiplexed``: the model id is the subject id (``"base"``: the base weights),
  the loaded model is the subject's delta (:mod:`profusion_rt.models.delta`), an LRU of
  ``subjects_per_replica`` of them per replica; Ray routes a request to a replica that holds its id;
* ``_batch`` is ``@serve.batch`` (``batch_size_fn`` counts images): Ray splits batches by multiplexed model
  id, so a batch never mixes subjects; inside, requests are grouped by the sampling parameters (the
  single-node scheduler's batch key) and run one group after another on the replica's one runtime thread,
  with the subject's delta swapped in first when the weights carry another one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import tempfile
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from ray import serve

from profusion_rt.artifacts.store import model_hash
from profusion_rt.core.errors import InvalidParameterError, ModelLoadError
from profusion_rt.core.presets import weights_label
from profusion_rt.core.safeio import read
from profusion_rt.models.delta import base_fingerprint, check_delta_fits, load_delta
from profusion_rt.pipeline import ProFusionPipeline, ReferenceEncoding
from profusion_rt.runtime import create_runtime
from profusion_rt.serve.config import ServeConfig
from profusion_rt.serve.errors import SubjectNotReadyError
from profusion_rt.serve.ray.spec import ModelSpec, ScaleSpec, config_from_dict
from profusion_rt.serve.requests import check_prompt, decode_image, png_bytes
from profusion_rt.serve.scheduler import SAMPLING_FIELDS
from profusion_rt.serve.storage import SubjectStorage
from profusion_rt.serve.subjects import SubjectStore, save_reference
from profusion_rt.training.delta import extract_delta

logger = logging.getLogger(__name__)

__all__ = ["BASE", "GeneratorCore", "generator_deployment"]

#: the multiplexed model id of the base weights (a request without a subject delta)
BASE = "base"


def build_pipeline(spec: ModelSpec) -> ProFusionPipeline:
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    pipe = ProFusionPipeline.load(spec.model, spec.promptnet, spec.device, spec.dtype, spec.weights_seed)
    pipe.progress_bar = False
    return pipe


class GeneratorCore:
    """What a Generator replica does, without Ray (the deployment class adds the Ray decorators)."""

    def __init__(self, spec: ModelSpec, config: ServeConfig, data: str):
        start = time.perf_counter()
        self.spec, self.config = spec, config
        self.pipe = build_pipeline(spec)
        self.runtime = create_runtime(self.pipe, spec.backend, artifacts=spec.artifacts,
                                      **({"precision": spec.precision} if spec.precision else {}))
        self.fingerprint = base_fingerprint(self.pipe)
        self.base_delta = extract_delta(self.pipe, self.fingerprint)
        self.model_hash = model_hash(self.pipe)
        self.storage = SubjectStorage(data)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="profusion-runtime")  # runtime: serial
        self._current = BASE  # the subject whose delta the weights carry
        self._references: OrderedDict[str, Any] = OrderedDict()
        self.stats = {"swaps": 0, "subject_loads": 0, "batches": 0, "pid": os.getpid(), "replica": uuid.uuid4().hex[:8]}
        if config.warmup_steps:
            self.runtime.warmup(num_inference_steps=config.warmup_steps)
        logger.info("generator replica ready in %.1f s (%s, %s)", time.perf_counter() - start, spec.model,
                    spec.backend)

    async def _on_runtime(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # -- subjects --------------------------------------------------------------------------------------------
    def _subject_meta(self, subject_id: str) -> dict[str, Any]:
        job = self.storage.get_job(subject_id)
        if job is not None and not self.storage.exists(subject_id):
            detail = f"failed: {job.get('error')}" if job.get("status") == "failed" else \
                f"{job.get('status')} (step {job.get('step', 0)}/{job.get('steps')})"
            raise SubjectNotReadyError(f"subject {subject_id} is not ready: customization {detail}")
        meta = self.storage.read_meta(subject_id)
        if meta.get("model_hash") != self.model_hash:
            raise SubjectNotReadyError(f"subject {subject_id} was made for another model ({meta.get('model_hash')}, "
                                       f"this server serves {self.model_hash})")
        return meta

    def load_delta_of(self, subject_id: str):
        """The subject's delta on this replica's device (the multiplexed model), checked against the file's
        recorded sha256 and against the served model; the base weights for ``"base"``."""
        if subject_id == BASE:
            return self.base_delta
        meta = self._subject_meta(subject_id)
        if not meta.get("has_delta"):
            return self.base_delta
        path = self.storage.fetch(subject_id, SubjectStore.DELTA, meta)
        delta = load_delta(path)
        check_delta_fits(self.pipe, delta, self.fingerprint)
        self.stats["subject_loads"] += 1
        return delta.to(self.pipe.device)

    def reference_of(self, subject_id: str):
        cached = self._references.get(subject_id)
        if cached is not None:
            self._references.move_to_end(subject_id)
            return cached
        meta = self._subject_meta(subject_id)
        if not meta.get("has_reference"):
            return None
        tensors, _ = read(self.storage.fetch(subject_id, SubjectStore.REFERENCE, meta), ModelLoadError,
                          "subject reference")
        reference = ReferenceEncoding(tensors["latents"].to(self.pipe.device, self.pipe.dtype),
                                      tensors["image_tokens"].to(self.pipe.device, self.pipe.dtype))
        self._references[subject_id] = reference
        while len(self._references) > self.config.subject_cache:
            self._references.popitem(last=False)
        return reference

    # -- generation ------------------------------------------------------------------------------------------
    def prepare(self, fields: dict[str, Any], image: bytes | None) -> dict[str, Any]:
        """The runtime kwargs of a request whose fields the ingress validated (the model-dependent checks:
        prompt tokens, the subject's reference)."""
        check_prompt(self.pipe.tokenizer, fields["prompt"], fields["class_word"], self.config.max_prompt_chars,
                     fields.get("negative_prompt"))
        subject_id = fields.get("subject_id")
        reference = self.reference_of(subject_id) if subject_id is not None else None
        if image is None and reference is None:
            raise InvalidParameterError("give a reference image (file 'image') or the id of a subject stored with one"
                                        if subject_id is None else
                                        f"subject {subject_id} has no stored reference image; upload one as 'image'")
        steps = fields.get("num_inference_steps")
        kwargs: dict[str, Any] = dict(
            prompt=fields["prompt"], class_word=fields["class_word"], negative_prompt=fields.get("negative_prompt"),
            num_inference_steps=self.config.default_steps if steps is None else steps,
            guidance_scale=fields["guidance_scale"], reference_guidance_scale=fields["reference_guidance_scale"],
            fusion_steps=fields["fusion_steps"], fusion_guidance_scale=fields["fusion_guidance_scale"],
            fusion_eta=fields["fusion_eta"], fusion_embedding_scale=fields["fusion_embedding_scale"],
            seed=fields["seed"] if fields.get("seed") is not None else secrets.randbelow(2**31),
            num_images_per_prompt=fields["num_images"], reference_mode=fields["reference_mode"], output_type="pil")
        if image is not None:
            kwargs["reference_image"] = decode_image(image, self.config)
        else:
            kwargs["reference"] = reference
        return kwargs

    def run_group(self, model_id: str, delta, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One runtime batch (same subject, same sampling parameters), on the runtime thread."""
        swap_s, swapped = 0.0, False
        if model_id != self._current:
            self._current = "<unknown>"  # a swap that fails half way is redone by the next batch
            swap_s = self.runtime.apply_delta(delta)
            self._current, swapped = model_id, True
            self.stats["swaps"] += 1
        outputs = self.runtime.generate_batch([r["kwargs"] for r in requests])
        t = self.runtime.last_timings
        self.stats["batches"] += 1
        batch_id = uuid.uuid4().hex[:12]
        images = sum(len(o.seeds) for o in outputs)
        text = {"weights": weights_label(self.pipe)}
        results = []
        for i, (request, out) in enumerate(zip(requests, outputs)):
            results.append({
                "pngs": [png_bytes(im, text) for im in out.images], "seeds": list(out.seeds),
                "batch_id": batch_id, "batch_subject": model_id, "batch_images": images,
                "batch_requests": len(requests), "first_of_batch": i == 0, "swapped": swapped and i == 0,
                "queue_s": request["started"] - request["enqueued"], "swap_s": swap_s, "prepare_s": t.prepare_s,
                "loop_s": t.loop_s, "decode_s": t.decode_s, "replica": self.stats["replica"]})
        return results

    async def run_batch(self, model_id: str, delta, items: list[dict[str, Any]]) -> list[Any]:
        """Group a Ray batch (one subject) by the sampling parameters and run the groups one after another;
        an error fails only the requests of its group."""
        groups: OrderedDict[tuple, list[int]] = OrderedDict()
        for i, item in enumerate(items):
            key = tuple(item["kwargs"].get(name) for name in SAMPLING_FIELDS)
            groups.setdefault(key, []).append(i)
        results: list[Any] = [None] * len(items)
        for indices in groups.values():
            group = [items[i] for i in indices]
            started = time.monotonic()
            for item in group:
                item["started"] = started
            try:
                out = await self._on_runtime(self.run_group, model_id, delta, group)
            except Exception as exc:  # noqa: BLE001 - handed to each waiting request of the group
                out = [exc] * len(group)
            for i, value in zip(indices, out):
                results[i] = value
        return results

    # -- subjects written by a replica -----------------------------------------------------------------------
    def store_subject(self, subject_id: str, meta: dict[str, Any], delta: bytes | None, image: bytes | None,
                      reference_mode: str, seed: int) -> dict[str, Any]:
        """Check an uploaded delta against the served model, encode the reference image, and store the
        subject in the shared storage (runs on the runtime thread: the encoders are the runtime's)."""
        with tempfile.TemporaryDirectory(prefix="profusion-subject-") as tmp:
            files: dict[str, Path] = {}
            if delta is not None:
                path = Path(tmp) / SubjectStore.DELTA
                path.write_bytes(delta)
                check_delta_fits(self.pipe, load_delta(path), self.fingerprint)
                files[SubjectStore.DELTA] = path
            if image is not None:
                reference = self.pipe.encode_reference(decode_image(image, self.config), mode=reference_mode,
                                                       seed=seed)
                path = Path(tmp) / SubjectStore.REFERENCE
                save_reference(path, reference, reference_mode, seed)
                files[SubjectStore.REFERENCE] = path
            meta = {**meta, "model_hash": self.model_hash, "base_fingerprint": self.fingerprint}
            return self.storage.put(subject_id, files, meta)


def generator_deployment(scale: ScaleSpec, config: ServeConfig):
    """The Generator deployment class with this deployment's multiplexing and batching sizes."""

    @serve.deployment(name="Generator")
    class Generator:
        def __init__(self, spec: dict[str, Any], config_values: dict[str, Any], data: str):
            self.core = GeneratorCore(ModelSpec(**spec), config_from_dict(config_values), data)

        @serve.multiplexed(max_num_models_per_replica=scale.subjects_per_replica)
        async def load_subject(self, subject_id: str):
            return await self.core._on_runtime(self.core.load_delta_of, subject_id)

        @serve.batch(max_batch_size=config.max_batch, batch_wait_timeout_s=config.max_wait_ms / 1000,
                     batch_size_fn=lambda items: sum(item["kwargs"]["num_images_per_prompt"] for item in items))
        async def _batch(self, items: list[dict[str, Any]]) -> list[Any]:
            model_id = serve.get_multiplexed_model_id() or BASE
            delta = await self.load_subject(model_id)
            results = await self.core.run_batch(model_id, delta, items)
            return results

        async def generate(self, fields: dict[str, Any], image: bytes | None) -> dict[str, Any]:
            kwargs = await asyncio.to_thread(self.core.prepare, fields, image)
            result = await self._batch({"kwargs": kwargs, "enqueued": time.monotonic()})
            if isinstance(result, Exception):
                raise result
            return result

        async def store_subject(self, *args) -> dict[str, Any]:
            return await self.core._on_runtime(self.core.store_subject, *args)

        def info(self) -> dict[str, Any]:
            return {"model_hash": self.core.model_hash, "backend": self.core.runtime.backend,
                    "device": str(self.core.pipe.device), "resolution": self.core.pipe.resolution,
                    "weights": weights_label(self.core.pipe), "current_subject": self.core._current,
                    **self.core.stats}

    return Generator
