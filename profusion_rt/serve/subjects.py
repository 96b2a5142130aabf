"""Stored subjects: ``<data>/subjects/<id>/`` with ``subject.json``, ``delta.safetensors`` and/or
``reference.safetensors``.

Ids are 32 random hex digits made by the server; no request value is ever used as a file-system path
(anything else is an unknown subject, 404). A subject is assembled in a hidden staging folder and renamed
into place in one step, so a reader or a crash sees either no subject or a whole one; staging folders left
by a crash are removed at the next start.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from profusion_rt.core.errors import ModelLoadError, OutputPathError
from profusion_rt.core.fsio import atomic_write_json, fsync_path, replace_dir, staging_dir
from profusion_rt.core.safeio import read, save_atomic
from profusion_rt.models.delta import check_delta_fits, load_delta
from profusion_rt.pipeline import ReferenceEncoding
from profusion_rt.serve.errors import SubjectNotReadyError, UnknownSubjectError

logger = logging.getLogger(__name__)

__all__ = ["CustomizationJob", "Subject", "SubjectStore", "check_subject_id", "load_fitting_delta",
           "save_reference"]

SUBJECT_FORMAT = "profusion-rt-subject"
SUBJECT_VERSION = 1
_ID_RE = re.compile(r"[0-9a-f]{32}")


@dataclass
class Subject:
    id: str
    meta: dict[str, Any]
    delta: Any = None  # models.delta.Delta
    reference: Any = None  # pipeline.ReferenceEncoding


@dataclass
class CustomizationJob:
    id: str
    status: str  # "queued", "training", "failed"
    steps: int
    step: int = 0
    error: str | None = None
    created: float = field(default_factory=time.time)


def check_subject_id(subject_id: Any) -> str:
    """The id if it is one the server could have made (32 lower-case hex digits); 404 otherwise."""
    if not isinstance(subject_id, str) or not _ID_RE.fullmatch(subject_id):
        raise UnknownSubjectError(f"unknown subject id {str(subject_id)[:80]!r}")
    return subject_id


class SubjectStore:
    """Subjects in ``<data_dir>/subjects/<id>/``, written atomically, loaded through a small LRU cache."""

    STAGING_PREFIX = ".staging-"
    META, DELTA, REFERENCE = "subject.json", "delta.safetensors", "reference.safetensors"

    def __init__(self, data_dir: str | os.PathLike, model_hash: str, base_fingerprint: str, cache_size: int = 4):
        self.root = Path(data_dir).expanduser().resolve() / "subjects"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputPathError(f"cannot create the subject folder {self.root}: {exc.strerror or exc}") from exc
        self.model_hash, self.base_fingerprint = model_hash, base_fingerprint
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Subject] = OrderedDict()
        self._lock = threading.Lock()
        self.jobs: dict[str, CustomizationJob] = {}
        for stale in self.root.glob(self.STAGING_PREFIX + "*"):
            logger.warning("removing an unfinished subject from an earlier run: %s", stale.name)
            shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(16)

    def path(self, subject_id: str) -> Path:
        return self.root / check_subject_id(subject_id)

    @contextmanager
    def staging(self, subject_id: str) -> Iterator[Path]:
        """A hidden folder to assemble subject ``subject_id`` in (:func:`~profusion_rt.core.fsio.staging_dir`);
        its files are fsynced and it is renamed into place when the block ends without an error (the caller
        writes ``subject.json`` last), removed otherwise."""
        target = self.path(subject_id)
        with staging_dir(self.root) as tmp:
            yield tmp
            if not (tmp / self.META).is_file():
                raise OutputPathError(f"subject {subject_id} was staged without {self.META}")
            for item in tmp.iterdir():
                fsync_path(item)
            fsync_path(tmp)
            replace_dir(tmp, target)  # ids are fresh: one rename, the subject appears whole

    def write_meta(self, folder: Path, meta: dict[str, Any]) -> None:
        atomic_write_json(folder / self.META, meta)

    def meta(self, subject_id: str, source: str, *, has_delta: bool, reference: dict | None,
             name: str | None = None, **extra) -> dict[str, Any]:
        return {
            "format": SUBJECT_FORMAT, "version": SUBJECT_VERSION, "id": subject_id, "source": source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "name": name,
            "has_delta": has_delta, "has_reference": reference is not None, "reference": reference,
            "model_hash": self.model_hash, "base_fingerprint": self.base_fingerprint, **extra,
        }

    def exists(self, subject_id: str) -> bool:
        return (self.path(subject_id) / self.META).is_file()

    def read_meta(self, subject_id: str) -> dict[str, Any]:
        path = self.path(subject_id) / self.META
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise UnknownSubjectError(f"unknown subject id {subject_id!r}") from None
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"subject {subject_id} is unreadable: {exc}") from exc

    def remember(self, subject: Subject) -> Subject:
        with self._lock:
            self._cache[subject.id] = subject
            self._cache.move_to_end(subject.id)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return subject

    def load(self, subject_id: str, device: torch.device, dtype: torch.dtype) -> Subject:
        """The subject with its delta and reference encoding in memory; 404 if unknown, 409 if not usable."""
        check_subject_id(subject_id)
        with self._lock:
            cached = self._cache.get(subject_id)
            if cached is not None:
                self._cache.move_to_end(subject_id)
                return cached
        job = self.jobs.get(subject_id)
        if job is not None:
            detail = f"failed: {job.error}" if job.status == "failed" else f"{job.status} (step {job.step}/{job.steps})"
            raise SubjectNotReadyError(f"subject {subject_id} is not ready: customization {detail}")
        meta = self.read_meta(subject_id)
        if meta.get("model_hash") != self.model_hash:
            raise SubjectNotReadyError(f"subject {subject_id} was made for another model ({meta.get('model_hash')}, "
                                       f"this server serves {self.model_hash})")
        folder = self.path(subject_id)
        subject = Subject(subject_id, meta)
        if meta.get("has_delta"):
            subject.delta = load_delta(folder / self.DELTA).to(device)
        if meta.get("has_reference"):
            tensors, _ = read(folder / self.REFERENCE, ModelLoadError, "subject reference")
            subject.reference = ReferenceEncoding(tensors["latents"].to(device, dtype),
                                                  tensors["image_tokens"].to(device, dtype))
        return self.remember(subject)

    def delete(self, subject_id: str) -> None:
        folder = self.path(subject_id)
        if not (folder / self.META).is_file():
            raise UnknownSubjectError(f"unknown subject id {subject_id!r}")
        trash = self.root / f"{self.STAGING_PREFIX}deleted-{subject_id}-{secrets.token_hex(4)}"
        os.rename(folder, trash)  # atomic: the subject is gone at once, the files follow
        shutil.rmtree(trash, ignore_errors=True)
        with self._lock:
            self._cache.pop(subject_id, None)


def save_reference(path: Path, reference, mode: str, seed: int) -> None:
    """A subject's reference encoding (VAE latent and CLIP image tokens) as safetensors, written atomically."""
    save_atomic(path, {"latents": reference.latents, "image_tokens": reference.image_tokens},
                {"format": "profusion-rt-reference", "mode": mode, "seed": str(seed)})




def load_fitting_delta(path: str | os.PathLike, pipe, base_fingerprint: str):
    """Read an uploaded delta and check that it fits ``pipe``, the served base model, with the one delta fit
    check (:func:`~profusion_rt.models.delta.check_delta_fits`: tensor names, shapes, base fingerprint;
    :class:`~profusion_rt.core.errors.DeltaMismatchError`, 422, otherwise); the delta on ``pipe``'s device."""
    delta = load_delta(path)
    check_delta_fits(pipe, delta, base_fingerprint)
    return delta.to(pipe.device)
