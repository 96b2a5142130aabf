"""Shared subject storage (profusion_rt.serve.storage): a local folder and an fsspec URL (memory://) keep
the single-node store's rules: a subject appears whole or not at all, a damaged file is refused."""

from __future__ import annotations

import json

import pytest

from profusion_rt.serve.errors import SubjectNotReadyError, UnknownSubjectError, http_status
from profusion_rt.serve.storage import DamagedSubjectError, SubjectStorage, is_remote_url
from profusion_rt.serve.subjects import SubjectStore

SID = "ab" * 16


def _files(tmp_path):
    delta, reference = tmp_path / "in-delta", tmp_path / "in-ref"
    delta.write_bytes(b"delta-bytes" * 100)
    reference.write_bytes(b"reference-bytes" * 50)
    return {SubjectStore.DELTA: delta, SubjectStore.REFERENCE: reference}


@pytest.fixture(params=["local", "memory"])
def storage(request, tmp_path):
    if request.param == "local":
        return SubjectStorage(tmp_path / "data")
    pytest.importorskip("fsspec")
    return SubjectStorage(f"memory://profusion-test-{tmp_path.name}")


def test_url_kinds(tmp_path):
    assert not is_remote_url(tmp_path) and not is_remote_url(f"file://{tmp_path}")
    assert is_remote_url("s3://bucket/prefix") and is_remote_url("memory://x")


def test_put_read_fetch_delete(storage, tmp_path):
    files = _files(tmp_path)
    assert not storage.exists(SID)
    meta = storage.put(SID, files, {"id": SID, "has_delta": True})
    assert set(meta["files"]) == {SubjectStore.DELTA, SubjectStore.REFERENCE}
    assert storage.exists(SID) and storage.read_meta(SID)["files"] == meta["files"]
    for name, src in files.items():
        assert storage.fetch(SID, name).read_bytes() == src.read_bytes()
    storage.delete(SID)
    assert not storage.exists(SID)
    with pytest.raises(UnknownSubjectError):
        storage.read_meta(SID)
    with pytest.raises(UnknownSubjectError):
        storage.delete(SID)


def test_damaged_file_is_refused(storage, tmp_path):
    storage.put(SID, _files(tmp_path), {"id": SID})
    target = f"{storage.root}/subjects/{SID}/{SubjectStore.DELTA}"
    if storage.remote:
        with storage.fs.open(target, "wb") as f:
            f.write(b"delta-bytes" * 99 + b"x" * 11)  # same size, other content
    else:
        with open(target, "r+b") as f:
            f.seek(5)
            f.write(b"X")
    with pytest.raises(DamagedSubjectError) as info:
        storage.fetch(SID, SubjectStore.DELTA)
    assert isinstance(info.value, SubjectNotReadyError) and http_status(info.value) == 409
    assert storage.fetch(SID, SubjectStore.REFERENCE).is_file()  # the intact file is still served


def test_a_subject_without_its_metadata_does_not_exist(storage, tmp_path):
    """Files written before subject.json (a writer that died half way) are not a subject."""
    if storage.remote:
        storage.fs.pipe_file(f"{storage.root}/subjects/{SID}/{SubjectStore.DELTA}", b"partial")
    else:
        folder = tmp_path / "data" / "subjects" / f"{SubjectStore.STAGING_PREFIX}x"
        folder.mkdir(parents=True)
        (folder / SubjectStore.DELTA).write_bytes(b"partial")
    assert not storage.exists(SID)
    with pytest.raises(UnknownSubjectError):
        storage.read_meta(SID)


def test_jobs(storage):
    assert storage.get_job(SID) is None and storage.jobs() == []
    storage.put_job(SID, {"id": SID, "status": "training", "step": 1})
    assert storage.get_job(SID)["status"] == "training" and len(storage.jobs()) == 1
    storage.remove_job(SID)
    assert storage.get_job(SID) is None


def test_ids_are_never_paths(storage):
    for bad in ("../x", "a" * 31, "A" * 32):
        with pytest.raises(UnknownSubjectError):
            storage.read_meta(bad)


def test_single_node_subjects_are_readable(tmp_path):
    """A subject stored by the single-node server (no recorded digests) is read from the same folder."""
    (tmp_path / "subjects" / SID).mkdir(parents=True)
    (tmp_path / "subjects" / SID / SubjectStore.META).write_text(json.dumps({"id": SID, "has_delta": True}))
    (tmp_path / "subjects" / SID / SubjectStore.DELTA).write_bytes(b"d")
    storage = SubjectStorage(tmp_path)
    assert storage.fetch(SID, SubjectStore.DELTA).read_bytes() == b"d"
