"""Shared subject storage behind a URL: a local folder (the default) or any fsspec URL (``s3://bucket/prefix``
with s3fs installed, ``gs://`` with gcsfs, ``memory://`` for tests), so every replica on every node reads
the subjects one replica wrote.

Layout under the root: ``subjects/<id>/subject.json`` + ``delta.safetensors`` and/or
``reference.safetensors`` (the same files as the single-node server's store), and ``jobs/<id>.json`` for
customizations in progress. Integrity rules:

* a reader never sees half a subject: on a local folder the subject is assembled in a hidden staging folder
  and renamed into place (:func:`~profusion_rt.core.fsio.replace_dir`); on an object store, where there is
  no folder rename, each file is one atomic PUT and ``subject.json`` is written last, so a subject exists
  for readers only once all of its files do;
* a damaged file is refused, not served: ``subject.json`` records the sha256 and size of every file, and
  :meth:`SubjectStorage.fetch` checks them before a file is used (:class:`DamagedSubjectError`, 409);
* ids are server-made (32 hex digits, :func:`~profusion_rt.serve.subjects.check_subject_id`); no request
  value becomes a path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

from profusion_rt.core.errors import ModelLoadError, OutputPathError
from profusion_rt.core.fsio import atomic_write_bytes, atomic_write_json, fsync_path, replace_dir, staging_dir
from profusion_rt.serve.errors import SubjectNotReadyError, UnknownSubjectError
from profusion_rt.serve.subjects import SubjectStore, check_subject_id

logger = logging.getLogger(__name__)

__all__ = ["DamagedSubjectError", "SubjectStorage", "file_digest", "is_remote_url"]

FILES = (SubjectStore.DELTA, SubjectStore.REFERENCE)
_CHUNK = 1 << 20


class DamagedSubjectError(SubjectNotReadyError):
    """A stored file does not match the size and sha256 that ``subject.json`` records: refused (409)."""


def is_remote_url(url: str | os.PathLike) -> bool:
    """True for an fsspec URL other than a local path (``file://`` counts as local)."""
    text = str(url)
    return "://" in text and not text.startswith("file://")


def file_digest(path: str | os.PathLike) -> tuple[str, int]:
    """sha256 hex digest and size of a local file."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


class SubjectStorage:
    """Subjects at a storage URL (see the module docstring). ``cache_dir``: where files of a remote store are
    downloaded to (a temporary folder by default); a local store serves its own files."""

    META = SubjectStore.META

    def __init__(self, url: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
        self.url = str(url)
        self.remote = is_remote_url(self.url)
        if self.remote:
            # deferred: fsspec (and the store's own package, e.g. s3fs) only for remote URLs
            import fsspec

            self.fs, root = fsspec.core.url_to_fs(self.url)
            self.root = root.rstrip("/")
            self.cache = Path(cache_dir or tempfile.mkdtemp(prefix="profusion-subjects-"))
        else:
            local = self.url[len("file://"):] if self.url.startswith("file://") else self.url
            self.fs, self.root = None, str(Path(local).expanduser().resolve())
            self.cache = None
            try:
                (Path(self.root) / "subjects").mkdir(parents=True, exist_ok=True)
                (Path(self.root) / "jobs").mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputPathError(f"cannot create the subject folder under {self.root}: "
                                      f"{exc.strerror or exc}") from exc

    def __repr__(self) -> str:
        return f"SubjectStorage({self.url!r})"

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # -- subjects --------------------------------------------------------------------------------------------
    def put(self, subject_id: str, files: dict[str, Path], meta: dict[str, Any]) -> dict[str, Any]:
        """Store subject ``subject_id`` from local ``files`` (name -> path, names from :data:`FILES`) and its
        metadata (``files`` with each file's sha256 and size is added); the subject appears whole or not at
        all. Returns the metadata as stored."""
        check_subject_id(subject_id)
        meta = dict(meta)
        meta["files"] = {}
        for name, path in files.items():
            if name not in FILES:
                raise OutputPathError(f"not a subject file: {name!r}")
            digest, size = file_digest(path)
            meta["files"][name] = {"sha256": digest, "bytes": size}
        if not self.remote:
            subjects = Path(self.root) / "subjects"
            with staging_dir(subjects) as tmp:
                for name, path in files.items():
                    shutil.copyfile(path, tmp / name)
                atomic_write_json(tmp / self.META, meta)
                for item in tmp.iterdir():
                    fsync_path(item)
                fsync_path(tmp)
                replace_dir(tmp, subjects / subject_id)  # fresh id: one rename, the subject appears whole
            return meta
        for name, path in files.items():  # one atomic PUT per object ...
            self.fs.put_file(str(path), self._path("subjects", subject_id, name))
        with self.fs.open(self._path("subjects", subject_id, self.META), "wb") as f:  # ... and the metadata last
            f.write((json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
        return meta

    def exists(self, subject_id: str) -> bool:
        check_subject_id(subject_id)
        path = self._path("subjects", subject_id, self.META)
        return self.fs.exists(path) if self.remote else Path(path).is_file()

    def read_meta(self, subject_id: str) -> dict[str, Any]:
        """``subject.json``; 404 when there is none."""
        check_subject_id(subject_id)
        path = self._path("subjects", subject_id, self.META)
        try:
            if self.remote:
                with self.fs.open(path, "rb") as f:
                    data = f.read()
            else:
                data = Path(path).read_bytes()
            return json.loads(data)
        except FileNotFoundError:
            raise UnknownSubjectError(f"unknown subject id {subject_id!r}") from None
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"subject {subject_id} is unreadable: {exc}") from exc

    def fetch(self, subject_id: str, name: str, meta: dict[str, Any] | None = None) -> Path:
        """A local path of the subject's file ``name``, checked against the size and sha256 in its
        metadata (:class:`DamagedSubjectError` when they differ or the file is missing). A remote file is
        downloaded into the cache first (once)."""
        meta = meta if meta is not None else self.read_meta(subject_id)
        want = (meta.get("files") or {}).get(name)
        if self.remote:
            local = self.cache / subject_id / name
            if not (local.is_file() and want is not None and file_digest(local) == (want["sha256"], want["bytes"])):
                local.parent.mkdir(parents=True, exist_ok=True)
                part = local.with_name(f".{name}.{secrets.token_hex(4)}.part")
                try:
                    self.fs.get_file(self._path("subjects", subject_id, name), str(part))
                    os.replace(part, local)
                except FileNotFoundError:
                    raise DamagedSubjectError(f"subject {subject_id}: {name} is missing; refused") from None
                finally:
                    part.unlink(missing_ok=True)
        else:
            local = Path(self._path("subjects", subject_id, name))
            if not local.is_file():
                raise DamagedSubjectError(f"subject {subject_id}: {name} is missing; refused")
        if want is not None:  # subjects stored by the single-node server carry no digests (safeio checks them)
            digest, size = file_digest(local)
            if (digest, size) != (want["sha256"], want["bytes"]):
                logger.error("subject %s: %s does not match its recorded sha256/size; refused", subject_id, name)
                raise DamagedSubjectError(f"subject {subject_id}: {name} is damaged (sha256 or size differs from "
                                          f"subject.json); refused")
        return local

    def delete(self, subject_id: str) -> None:
        """Remove a subject; 404 when there is none. The metadata goes first, so readers stop seeing it at once."""
        check_subject_id(subject_id)
        if not self.exists(subject_id):
            raise UnknownSubjectError(f"unknown subject id {subject_id!r}")
        if self.remote:
            self.fs.rm_file(self._path("subjects", subject_id, self.META))
            self.fs.rm(self._path("subjects", subject_id), recursive=True)
            return
        folder = Path(self._path("subjects", subject_id))
        trash = folder.with_name(f"{SubjectStore.STAGING_PREFIX}deleted-{subject_id}-{secrets.token_hex(4)}")
        os.rename(folder, trash)  # atomic: the subject is gone at once, the files follow
        shutil.rmtree(trash, ignore_errors=True)

    # -- customization jobs ----------------------------------------------------------------------------------
    def put_job(self, subject_id: str, status: dict[str, Any]) -> None:
        """Record a customization's status (``jobs/<id>.json``, replaced atomically)."""
        check_subject_id(subject_id)
        data = (json.dumps(status, sort_keys=True) + "\n").encode()
        if self.remote:
            with self.fs.open(self._path("jobs", f"{subject_id}.json"), "wb") as f:
                f.write(data)
        else:
            atomic_write_bytes(self._path("jobs", f"{subject_id}.json"), data)

    def get_job(self, subject_id: str) -> dict[str, Any] | None:
        check_subject_id(subject_id)
        path = self._path("jobs", f"{subject_id}.json")
        try:
            if self.remote:
                with self.fs.open(path, "rb") as f:
                    return json.loads(f.read())
            return json.loads(Path(path).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None

    def remove_job(self, subject_id: str) -> None:
        check_subject_id(subject_id)
        path = self._path("jobs", f"{subject_id}.json")
        try:
            if self.remote:
                self.fs.rm_file(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass

    def jobs(self) -> list[dict[str, Any]]:
        """Every recorded customization status."""
        folder = self._path("jobs")
        if self.remote:
            names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False)] if self.fs.exists(folder) else []
        else:
            names = [p.name for p in Path(folder).iterdir()]
        out = []
        for n in names:
            if n.endswith(".json") and len(n) == 37:
                job = self.get_job(n[:-5])
                if job is not None:
                    out.append(job)
        return out
