"""``customize=true`` on a cluster: a Ray task with its own resources (``customize_num_cpus`` /
``customize_num_gpus``) that loads its own base pipeline, customizes it on the reference image and stores
the subject in the shared storage; never inside a Generator replica. Its progress is the job record
``jobs/<id>.json`` of the storage, which every ingress replica reads for ``GET /v1/subjects/{id}``."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from profusion_rt.artifacts.store import model_hash
from profusion_rt.core.errors import ProFusionError
from profusion_rt.serve.ray.generator import build_pipeline
from profusion_rt.serve.ray.spec import ModelSpec, config_from_dict
from profusion_rt.serve.requests import decode_image
from profusion_rt.serve.storage import SubjectStorage
from profusion_rt.serve.subjects import SUBJECT_FORMAT, SUBJECT_VERSION, SubjectStore, save_reference
from profusion_rt.training import TrainConfig, customize, save_delta

logger = logging.getLogger(__name__)

__all__ = ["customize_subject", "subject_meta"]


def subject_meta(subject_id: str, source: str, *, has_delta: bool, reference: dict | None, name: str | None,
                 **extra) -> dict[str, Any]:
    """The subject.json fields of the single-node store (the model hash and fingerprint are added by the writer)."""
    return {"format": SUBJECT_FORMAT, "version": SUBJECT_VERSION, "id": subject_id, "source": source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "name": name, "has_delta": has_delta,
            "has_reference": reference is not None, "reference": reference, **extra}


@ray.remote(max_retries=0)
def customize_subject(spec: dict[str, Any], config_values: dict[str, Any], data: str, subject_id: str,
                      image: bytes, steps: int, mode: str, seed: int, name: str | None) -> str:
    storage = SubjectStorage(data)
    job = {"id": subject_id, "status": "training", "step": 0, "steps": steps, "error": None, "created": time.time()}
    try:
        config = config_from_dict(config_values)
        storage.put_job(subject_id, job)
        pipe = build_pipeline(ModelSpec(**spec))
        base_hash = model_hash(pipe)  # of the base weights: the hash the Generator replicas serve
        picture = decode_image(image, config)
        last = [0.0]

        def progress(trainer, loss):
            if time.monotonic() - last[0] > 1.0:
                last[0] = time.monotonic()
                storage.put_job(subject_id, {**job, "step": trainer.step})

        start = time.perf_counter()
        result = customize(pipe, picture, steps=steps, config=TrainConfig.customization(seed=seed),
                           num_augmentations=config.customize_augmentations, progress=False, callback=progress)
        reference = pipe.encode_reference(picture, mode=mode, seed=seed)
        with tempfile.TemporaryDirectory(prefix="profusion-customize-") as tmp:
            delta_path, reference_path = Path(tmp) / SubjectStore.DELTA, Path(tmp) / SubjectStore.REFERENCE
            save_delta(delta_path, pipe, result.base_fingerprint, training={"steps": steps, "seed": seed, "server": True})
            save_reference(reference_path, reference, mode, seed)
            meta = subject_meta(subject_id, "customized", has_delta=True, reference={"mode": mode, "seed": seed},
                                name=name, customize_steps=steps,
                                customize_seconds=round(time.perf_counter() - start, 3),
                                model_hash=base_hash, base_fingerprint=result.base_fingerprint)
            storage.put(subject_id, {SubjectStore.DELTA: delta_path, SubjectStore.REFERENCE: reference_path}, meta)
        storage.remove_job(subject_id)
        logger.info("customized subject %s in %.1f s", subject_id, time.perf_counter() - start)
        return subject_id
    except BaseException as exc:  # noqa: BLE001 - recorded in the job's status
        if not isinstance(exc, ProFusionError):
            logger.exception("customization of subject %s failed", subject_id)
        storage.put_job(subject_id, {**job, "status": "failed", "error": f"{type(exc).__name__}: {exc}"})
        raise
