"""HTTP API of ``profusion-rt serve`` against a real uvicorn server on loopback: the happy path, the JSON
variant, every kind of bad input, queue overflow, timeouts and client disconnects."""

from __future__ import annotations

import asyncio
import base64
import io
import time

import httpx
import pytest
from serve_helpers import STEPS, expected_array, generate_fields, metric, png_array


def test_healthz_and_metrics(client, server):
    health = client.get("/healthz")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["backend"] == "torch" and body["resolution"] == 256
    text = client.get("/metrics")
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    for name in ("profusion_http_requests_total", "profusion_http_request_duration_seconds_bucket",
                 "profusion_queue_depth", "process_resident_memory_bytes", "profusion_batch_size_images_bucket",
                 "profusion_images_generated_total"):
        assert name in text.text, name
    assert metric(text.text, "profusion_http_requests_total", route="/healthz", status="200") >= 1
    assert metric(text.text, "process_resident_memory_bytes") > 10e6


def test_generate_png_matches_runtime(client, reference_png, ref_runtime):
    response = client.post("/v1/generate", files={"image": ("face.png", reference_png, "image/png")},
                           data=generate_fields(seed=7, fusion_steps=1))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "7"
    assert int(response.headers["x-batch-size"]) >= 1
    timing = response.headers["server-timing"]
    for part in ("queue;dur=", "prepare;dur=", "loop;dur=", "decode;dur=", "total;dur="):
        assert part in timing
    got = png_array(response.content)
    assert got.shape == (256, 256, 3)
    want = expected_array(ref_runtime, reference_png, prompt="a {S*} wearing sunglasses", seed=7)
    assert (got == want).all()  # a lone request runs exactly like the in-process runtime


def test_generate_json_variant(client, reference_png):
    body = {"prompt": "a {S*} in the snow", "image_base64": base64.b64encode(reference_png).decode(),
            "num_inference_steps": STEPS, "num_images": 2, "fusion_steps": 0}  # no seed: the server draws one
    response = client.post("/v1/generate?format=json", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["media_type"] == "image/png" and len(data["images"]) == 2
    assert data["seeds"][1] == data["seeds"][0] + 1  # per-image seeds: seed, seed + 1
    assert response.headers["x-seed"] == f"{data['seeds'][0]},{data['seeds'][1]}"
    assert set(data["timings"]) >= {"queue_ms", "prepare_ms", "loop_ms", "decode_ms", "total_ms"}
    a, b = (png_array(base64.b64decode(im)) for im in data["images"])
    assert a.shape == (256, 256, 3) and not (a == b).all()


def _png(size, mode="RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return buf.getvalue()


def _gif() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("P", (32, 32)).save(buf, format="GIF")
    return buf.getvalue()


BAD_REQUESTS = {
    # name: (fields, image bytes or None (the reference) or False (no image), status, error type)
    "no-image-no-subject": ({}, False, 422, "InvalidParameterError"),
    "no-placeholder": ({"prompt": "a person"}, None, 422, "PromptError"),
    "two-placeholders": ({"prompt": "a {S*} and a {S*}"}, None, 422, "PromptError"),
    "misspelt-placeholder": ({"prompt": "a {s*} smiling"}, None, 422, "PromptError"),
    "prompt-too-long": ({"prompt": "a {S*} " + "very " * 90 + "happy"}, None, 422, "PromptError"),
    "empty-prompt": ({"prompt": "  "}, None, 422, "PromptError"),
    "control-chars": ({"prompt": "a {S*}\x00"}, None, 422, "PromptError"),
    "class-word-braces": ({"class_word": "{S*}"}, None, 422, "PromptError"),
    "steps-over-limit": ({"num_inference_steps": "5"}, None, 422, "InvalidParameterError"),
    "steps-zero": ({"num_inference_steps": "0"}, None, 422, "InvalidParameterError"),
    "steps-not-int": ({"num_inference_steps": "two"}, None, 422, "InvalidParameterError"),
    "negative-guidance": ({"guidance_scale": "-1"}, None, 422, "InvalidParameterError"),
    "nan-guidance": ({"guidance_scale": "nan"}, None, 422, "InvalidParameterError"),
    "eta-above-one": ({"fusion_eta": "2"}, None, 422, "InvalidParameterError"),
    "fusion-steps-over-limit": ({"fusion_steps": "9"}, None, 422, "InvalidParameterError"),
    "negative-seed": ({"seed": "-3"}, None, 422, "InvalidParameterError"),
    "bad-reference-mode": ({"reference_mode": "median"}, None, 422, "InvalidParameterError"),
    "unknown-field": ({"steps": "2"}, None, 422, "InvalidParameterError"),
    "png-with-two-images": ({"num_images": "2"}, None, 422, "InvalidParameterError"),
    "too-many-images": ({"num_images": "5"}, None, 422, "InvalidParameterError"),
    "not-an-image": ({}, b"hello, I am text" * 10, 415, "UnsupportedMediaError"),
    "gif-not-accepted": ({}, "gif", 415, "UnsupportedMediaError"),
    "empty-image": ({}, b"", 400, "ImageError"),
    "truncated-png": ({}, "truncated", 400, "ImageError"),
    "too-many-pixels": ({}, "big", 413, "PayloadTooLargeError"),
    "unknown-subject": ({"subject_id": "0" * 32}, False, 404, "UnknownSubjectError"),
    "subject-id-is-a-path": ({"subject_id": "../../../etc/passwd"}, False, 404, "UnknownSubjectError"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_generate_requests(client, reference_png, name):
    fields, image, status, error = BAD_REQUESTS[name]
    if image is None:
        image = reference_png
    elif image == "gif":
        image = _gif()
    elif image == "truncated":
        image = reference_png[: len(reference_png) // 2]
    elif image == "big":
        image = _png((1000, 400))  # 400k pixels > 360k: small as a file, too large as an image
    files = {"image": ("x.png", image, "image/png")} if image is not False else None
    response = client.post("/v1/generate", files=files, data=generate_fields(**fields))
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"]["type"] == error and body["error"]["message"]


def test_malformed_bodies(client, server):
    limit = server.state.config.max_upload_bytes
    cases = [
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "BadRequestError"),
        (dict(content=b"[1, 2]", headers={"content-type": "application/json"}), 400, "BadRequestError"),
        (dict(json={"prompt": "a {S*}", "image_base64": "###"}), 400, "BadRequestError"),
        (dict(content=b"prompt=x", headers={"content-type": "text/plain"}), 415, "UnsupportedMediaError"),
        (dict(content=b"--xx\r\nbroken", headers={"content-type": "multipart/form-data"}), 400,
         "BadRequestError"),  # no boundary
        (dict(files={"image": ("x.png", b"\0" * (limit + 10), "image/png")}, data=generate_fields()), 413,
         "PayloadTooLargeError"),
        (dict(files={"image": ("x.png", b"1", "image/png"), "other": ("y", b"2", "image/png")},
              data=generate_fields()), 400, "BadRequestError"),
    ]
    for kwargs, status, error in cases:
        response = client.post("/v1/generate", **kwargs)
        assert response.status_code == status, (kwargs.get("headers"), response.text)
        assert response.json()["error"]["type"] == error
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/nothing").json()["error"]["type"] == "NotFound"
    assert client.get("/v1/generate").status_code == 405


def test_body_over_limit_streamed_without_length(client, server):
    """A chunked upload (no Content-Length) is cut off at the byte limit."""
    limit = server.state.config.max_upload_bytes

    def chunks():
        boundary = b"--b\r\n"
        yield boundary + b'Content-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
        for _ in range(limit // 65536 + 4):
            yield b"\0" * 65536
        yield b"\r\n--b--\r\n"

    response = client.post("/v1/generate", content=chunks(),
                           headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413, response.text


def _post_async(url, files, data, timeout):
    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as c:
            return await c.post("/v1/generate", files=files, data=data)
    return go()


def test_queue_overflow_and_timeouts(server, reference_png):
    """While the worker is paused, max_queue requests fill the queue, the next is refused with 429 at once,
    and the queued ones time out (504) and leave the queue without running."""
    state = server.state
    images_before = state.metrics.images.value()
    max_queue = state.config.max_queue
    files = {"image": ("x.png", reference_png, "image/png")}

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            queued = [asyncio.create_task(c.post("/v1/generate", files=files,
                                                 data=generate_fields(seed=i, timeout_s=1.5)))
                      for i in range(max_queue)]
            for _ in range(200):
                if state.scheduler.depth == max_queue:
                    break
                await asyncio.sleep(0.02)
            assert state.scheduler.depth == max_queue
            start = time.perf_counter()
            over = await c.post("/v1/generate", files=files, data=generate_fields(seed=99))
            refused_in = time.perf_counter() - start
            return over, refused_in, await asyncio.gather(*queued)

    with state.scheduler.paused():
        over, refused_in, queued = asyncio.run(scenario())
        assert over.status_code == 429 and over.json()["error"]["type"] == "QueueFullError"
        assert over.headers["retry-after"] == "1"
        assert refused_in < 1.0
        assert [r.status_code for r in queued] == [504] * max_queue
        assert queued[0].json()["error"]["type"] == "RequestTimeoutError"
        assert state.scheduler.depth == 0
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "profusion_requests_rejected_total") >= 1
    assert metric(text, "profusion_requests_timed_out_total") >= max_queue
    assert metric(text, "profusion_http_requests_total", route="/v1/generate", status="429") >= 1
    time.sleep(0.2)
    assert state.metrics.images.value() == images_before  # none of them ran


def test_client_disconnect_cancels_queued_request(server, reference_png):
    state = server.state
    before = state.metrics.cancelled.value()
    images_before = state.metrics.images.value()
    with state.scheduler.paused():
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/generate", files={"image": ("x.png", reference_png, "image/png")},
                       data=generate_fields(seed=5), timeout=httpx.Timeout(60, read=0.7))
        for _ in range(100):
            if state.metrics.cancelled.value() > before:
                break
            time.sleep(0.02)
        assert state.metrics.cancelled.value() == before + 1
        assert state.scheduler.depth == 0
    time.sleep(0.2)
    assert state.metrics.images.value() == images_before
