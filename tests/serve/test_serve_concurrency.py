"""Concurrency over HTTP: 16 requests in flight from 4 threads are all answered correctly and batched; a
bounded soak does not grow the server's memory."""

from __future__ import annotations

import asyncio
import gc
import threading

import httpx
import torch
from serve_helpers import assert_close_images, expected_array, generate_fields, metric, png_array

PROMPT = "a {S*} wearing sunglasses"


def _soak_fields(seed: int) -> dict[str, str]:
    # fusion_steps 0 halves the cost of a request; the serving path is the same
    return generate_fields(seed=seed, fusion_steps=0)


def test_16_concurrent_requests_from_4_threads(server, reference_png, ref_runtime):
    state = server.state
    files = {"image": ("face.png", reference_png, "image/png")}
    batches_before = state.metrics.batch_requests.snapshot()
    results: dict[int, httpx.Response] = {}
    errors: list[BaseException] = []

    def thread_main(t: int) -> None:
        async def four():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
                seeds = [100 + (4 * t + k) % 4 for k in range(4)]
                responses = await asyncio.gather(*(c.post("/v1/generate", files=files, data=_soak_fields(s))
                                                   for s in seeds))
                return {4 * t + k: r for k, r in enumerate(responses)}
        try:
            results.update(asyncio.run(four()))
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=thread_main, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    assert not errors, errors
    assert sorted(results) == list(range(16))
    expected = {s: expected_array(ref_runtime, reference_png, prompt=PROMPT, seed=s, fusion_steps=0)
                for s in range(100, 104)}
    sizes = []
    for i, r in results.items():
        assert r.status_code == 200, r.text
        seed = 100 + i % 4
        assert r.headers["x-seed"] == str(seed)
        sizes.append(int(r.headers["x-batch-size"]))
        assert_close_images(png_array(r.content), expected[seed])  # each got its own image, not a neighbour's
    assert max(sizes) > 1, sizes  # batching happened
    assert max(sizes) <= state.config.max_batch
    batches_after = state.metrics.batch_requests.snapshot()
    batched = (batches_after[float("inf")] - batches_after[1]) - (batches_before[float("inf")] - batches_before[1])
    assert batched >= 1  # the metrics saw runtime batches of more than one request
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "profusion_queue_depth") == 0


def _live_objects() -> dict[str, int]:
    """Live request-sized objects in this process (the server runs here): tensors, PIL images, jobs,
    results, futures. A leak of any request's data keeps some of them alive."""
    from concurrent.futures import Future

    from PIL import Image

    from profusion_rt.serve import GenerationResult, Job

    gc.collect()
    kinds = {"tensor": torch.Tensor, "image": Image.Image, "job": Job, "result": GenerationResult,
             "future": Future}
    counts = dict.fromkeys(kinds, 0)
    for obj in gc.get_objects():
        for name, kind in kinds.items():
            if isinstance(obj, kind):
                counts[name] += 1
    return counts


def test_memory_is_bounded_over_a_soak(server, reference_png):
    """16 requests (4 rounds of 4 concurrent) after a warm-up round leave no request object alive (tensors,
    images, jobs, results, futures: the same counts as before), and resident memory grows by less than 96 MB.
    The RSS margin is wide on purpose: glibc gives each thread of the request thread pool its own malloc
    arena, so RSS steps by tens of MB without any leak; the object counts are the sensitive check."""
    files = {"image": ("face.png", reference_png, "image/png")}

    async def round_of_4(c, base):
        rs = await asyncio.gather(*(c.post("/v1/generate", files=files, data=_soak_fields(base + k))
                                    for k in range(4)))
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]

    async def soak():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            await round_of_4(c, 1000)  # warm-up: buffers for this shape, allocator pools
            start = metric((await c.get("/metrics")).text, "process_resident_memory_bytes")
            objects = _live_objects()
            for r in range(4):
                await round_of_4(c, 2000 + 4 * r)
            end = metric((await c.get("/metrics")).text, "process_resident_memory_bytes")
            return start, end, objects, _live_objects()

    start, end, objects_before, objects_after = asyncio.run(soak())
    assert objects_after == objects_before
    assert start > 0
    assert end - start < 96e6, f"resident memory grew by {(end - start) / 1e6:.1f} MB over 16 requests"
