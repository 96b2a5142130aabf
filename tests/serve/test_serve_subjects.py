"""Stored subjects over HTTP: reference encodings, uploaded deltas (swapped in and back out, never batched
with other subjects), background customization, deletion; atomic storage and path safety."""

from __future__ import annotations

import asyncio
import copy
import os
import time
from pathlib import Path

import httpx
import pytest
import torch
from serve_helpers import assert_close_images, expected_array, generate_fields, png_array


def _files_under(root: Path) -> set[Path]:
    return {p for p in Path(root).rglob("*")}


@pytest.fixture(scope="module")
def subject_delta(tiny_pipe, tmp_path_factory):
    """A delta for the tiny base (PromptNet and attention q/k/v perturbed) and a pipeline carrying it."""
    from profusion_rt.models.delta import base_fingerprint, delta_parameters
    from profusion_rt.training.delta import save_delta

    custom = copy.deepcopy(tiny_pipe)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in delta_parameters(custom).values():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    path = save_delta(tmp_path_factory.mktemp("delta") / "s.delta.safetensors", custom, base_fingerprint(tiny_pipe))
    return path, custom


def test_subject_from_image_equals_uploading_the_image(client, reference_png):
    created = client.post("/v1/subjects", files={"image": ("face.png", reference_png, "image/png")},
                          data={"seed": "11", "name": "astronaut"})
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    assert len(sid) == 32 and created.json()["has_reference"] and not created.json()["has_delta"]
    info = client.get(f"/v1/subjects/{sid}").json()
    assert info["status"] == "ready" and info["name"] == "astronaut" and info["reference"] == {"mode": "sample",
                                                                                                 "seed": 11}
    by_subject = client.post("/v1/generate", data=generate_fields(subject_id=sid, seed=11))
    by_image = client.post("/v1/generate", files={"image": ("face.png", reference_png, "image/png")},
                           data=generate_fields(seed=11))
    assert by_subject.status_code == by_image.status_code == 200
    assert by_subject.headers["x-subject-id"] == sid
    # the stored encoding is what the request with the image computes for the same seed
    assert (png_array(by_subject.content) == png_array(by_image.content)).all()


def test_delta_upload_checks(client, server, subject_delta, reference_png, tmp_path, tiny_pipe):
    from profusion_rt.training.delta import save_delta

    subjects_dir = server.state.subjects.root
    before = sorted(os.listdir(subjects_dir))
    wrong_base = save_delta(tmp_path / "w.delta.safetensors", tiny_pipe, "0" * 64)
    cases = [
        (wrong_base.read_bytes(), 422, "DeltaMismatchError"),
        (b"not a safetensors file", 422, "DeltaError"),
    ]
    for data, status, error in cases:
        response = client.post("/v1/subjects", files={"delta": ("d.safetensors", data, "application/octet-stream")})
        assert response.status_code == status, response.text
        assert response.json()["error"]["type"] == error
    for fields in ({"customize": "maybe"}, {"bogus": "1"}, {"customize_steps": "2"}, {"reference_mode": "x"},
                   {"seed": "-1"}, {"name": "x" * 101}):
        response = client.post("/v1/subjects", files={"image": ("f.png", reference_png, "image/png")}, data=fields)
        assert response.status_code == 422, (fields, response.text)
        assert response.json()["error"]["type"] == "InvalidParameterError"
    assert client.post("/v1/subjects", data={"name": "x"}).status_code == 422  # neither delta nor image
    assert sorted(os.listdir(subjects_dir)) == before  # nothing half-written left behind


def test_upload_names_are_never_paths(client, server, subject_delta, tmp_path):
    path, _ = subject_delta
    data_dir = server.state.config.data_dir
    outside_before = _files_under(data_dir.parent)
    response = client.post("/v1/subjects", files={
        "delta": ("../../../escaped.delta.safetensors", path.read_bytes(), "application/octet-stream")},
        data={"name": "../../../escaped"})
    assert response.status_code == 201, response.text
    sid = response.json()["id"]
    folder = server.state.subjects.root / sid
    assert sorted(p.name for p in folder.iterdir()) == ["delta.safetensors", "subject.json"]
    new = _files_under(data_dir.parent) - outside_before
    assert all(str(p).startswith(str(server.state.subjects.root)) for p in new), new
    # a delta-only subject needs an image with each request
    response = client.post("/v1/generate", data=generate_fields(subject_id=sid))
    assert response.status_code == 422 and "no stored reference" in response.json()["error"]["message"]


def test_subjects_with_deltas_swap_and_never_batch_together(server, subject_delta, reference_png, ref_runtime):
    """Two requests of a delta subject and two of the base model, queued together, run as two batches of two;
    each answer matches what a runtime with (or without) the delta gives; the weights go back to the base."""
    from profusion_rt.runtime import create_runtime

    path, custom = subject_delta
    state = server.state
    files = {"image": ("face.png", reference_png, "image/png")}
    created = httpx.post(server.url + "/v1/subjects", files={**files, "delta": ("d", path.read_bytes())}, timeout=60)
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    swaps_before = state.metrics.delta_swaps.value()

    plan = [(sid, 1), (None, 2), (sid, 3), (None, 4)]

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            with state.scheduler.paused():
                tasks = []
                for subject, seed in plan:
                    fields = generate_fields(seed=seed, fusion_steps=1)
                    if subject:  # the subject was stored with the reference image
                        fields["subject_id"] = subject
                    tasks.append(asyncio.create_task(
                        c.post("/v1/generate", data=fields, files=None if subject else files)))
                    for _ in range(200):  # queue them in this order
                        if state.scheduler.depth == len(tasks):
                            break
                        await asyncio.sleep(0.01)
                assert state.scheduler.depth == len(plan)
            return await asyncio.gather(*tasks)

    responses = asyncio.run(scenario())
    for r in responses:
        assert r.status_code == 200, r.text
        assert r.headers["x-batch-requests"] == "2"
    custom_runtime = create_runtime(custom, "torch")
    for (subject, seed), r in zip(plan, responses):
        runtime = custom_runtime if subject else ref_runtime
        want = expected_array(runtime, reference_png, prompt="a {S*} wearing sunglasses", seed=seed)
        assert_close_images(png_array(r.content), want)
    assert state.metrics.delta_swaps.value() - swaps_before in (1, 2)  # in (and back out, if base ran last)
    base_again = httpx.post(server.url + "/v1/generate", files=files, data=generate_fields(seed=2, fusion_steps=1),
                            timeout=60)
    assert base_again.headers["x-batch-size"] == "1"
    want = expected_array(ref_runtime, reference_png, prompt="a {S*} wearing sunglasses", seed=2)
    assert (png_array(base_again.content) == want).all()
    assert state.scheduler.current_subject is None


def test_customize_in_background_then_generate(client, reference_png):
    response = client.post("/v1/subjects", files={"image": ("f.png", reference_png, "image/png")},
                           data={"customize": "true", "customize_steps": "2", "seed": "3"})
    assert response.status_code == 202, response.text
    sid = response.json()["id"]
    assert response.json()["status"] in ("queued", "training")
    status = {}
    for _ in range(600):
        status = client.get(f"/v1/subjects/{sid}").json()
        if status["status"] in ("ready", "failed"):
            break
        early = client.post("/v1/generate", data=generate_fields(subject_id=sid))
        assert early.status_code == 409 and early.json()["error"]["type"] == "SubjectNotReadyError"
        time.sleep(0.2)
    assert status["status"] == "ready", status
    assert status["source"] == "customized" and status["has_delta"] and status["has_reference"]
    response = client.post("/v1/generate", data=generate_fields(subject_id=sid, seed=3))
    assert response.status_code == 200 and response.headers["x-subject-id"] == sid
    over = client.post("/v1/subjects", files={"image": ("f.png", reference_png, "image/png")},
                       data={"customize": "true", "customize_steps": "99"})
    assert over.status_code == 422


def test_delete_subject(client, reference_png):
    sid = client.post("/v1/subjects", files={"image": ("f.png", reference_png, "image/png")}).json()["id"]
    assert client.delete(f"/v1/subjects/{sid}").status_code == 200
    assert client.get(f"/v1/subjects/{sid}").status_code == 404
    assert client.post("/v1/generate", data=generate_fields(subject_id=sid)).status_code == 404
    assert client.delete(f"/v1/subjects/{sid}").status_code == 404
    assert client.get("/v1/subjects/..%2F..%2Fetc").status_code == 404


def test_store_is_atomic_and_cleans_up(tmp_path):
    """A crash while a subject is written leaves only a staging folder, which the next start removes; a
    failure inside the staging block leaves nothing."""
    from profusion_rt.serve import SubjectStore, UnknownSubjectError

    store = SubjectStore(tmp_path, "hash", "fp")
    sid = store.new_id()
    with pytest.raises(RuntimeError):
        with store.staging(sid) as folder:
            (folder / "delta.safetensors").write_bytes(b"half")
            raise RuntimeError("crash while writing")
    assert list(store.root.iterdir()) == []
    # a hard crash (no clean-up ran): the staging folder stays until the next start
    leftover = store.root / f"{SubjectStore.STAGING_PREFIX}{sid}-dead"
    leftover.mkdir()
    (leftover / "delta.safetensors").write_bytes(b"half")
    assert not store.exists(sid)
    SubjectStore(tmp_path, "hash", "fp")
    assert list(store.root.iterdir()) == []
    with store.staging(sid) as folder:
        store.write_meta(folder, store.meta(sid, "image", has_delta=False, reference=None))
    assert store.exists(sid) and store.read_meta(sid)["id"] == sid
    for bad in ("../x", "A" * 32, sid + "/..", "", None):
        with pytest.raises(UnknownSubjectError):
            store.path(bad)
