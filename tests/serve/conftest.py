"""Fixtures of the serving tests: one tiny-preset server on loopback for the whole directory, a reference
runtime to compute expected images, and small helpers."""

from __future__ import annotations

import io

import pytest

from serve_helpers import STEPS


@pytest.fixture(scope="session")
def reference_png(astronaut) -> bytes:
    """The astronaut at 256 px as PNG bytes (the tiny preset's resolution)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(astronaut).resize((256, 256)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def ref_runtime(tiny_pipe):
    """A torch runtime over the shared tiny pipeline (the same weights as the server's): expected images."""
    from profusion_rt.runtime import create_runtime

    return create_runtime(tiny_pipe, "torch")


@pytest.fixture(scope="session")
def serve_config(tmp_path_factory):
    from profusion_rt.serve import ServeConfig

    return ServeConfig(
        data_dir=tmp_path_factory.mktemp("serve-data"), max_queue=16, max_batch=4, max_wait_ms=50,
        timeout_s=120, max_upload_bytes=1_000_000, max_delta_bytes=20_000_000, max_pixels=600 * 600,
        steps_limit=4, default_steps=STEPS, customize_steps=2, customize_steps_limit=4,
        customize_augmentations=3, warmup_steps=1, poll_interval_s=0.02)


@pytest.fixture(scope="session")
def server(serve_config):
    """The app over its own tiny pipeline (subject deltas change its weights), served by uvicorn on
    127.0.0.1 with a free port. ``server.app.state.server`` is the :class:`profusion_rt.serve.Server`."""
    from profusion_rt.pipeline import ProFusionPipeline
    from profusion_rt.runtime import create_runtime
    from profusion_rt.serve import BackgroundServer, create_app

    pipe = ProFusionPipeline.from_preset("tiny", seed=0)
    pipe.progress_bar = False
    app = create_app(create_runtime(pipe, "torch"), serve_config)
    background = BackgroundServer(app)
    background.app = app
    background.state = app.state.server
    yield background
    background.stop()


@pytest.fixture()
def client(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c
