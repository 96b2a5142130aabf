"""Fixtures of the Ray Serve tests: ONE local Ray cluster on loopback per test module, the application
deployed once on it (tiny preset, two Generator replicas), torn down in a finalizer that leaves nothing
behind (no ray process, no ``~/.ray/auth_token``, no session folder)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

STEPS = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_processes() -> list[str]:
    """Command lines of ray processes on this machine (workers, raylet, GCS)."""
    out = subprocess.run(["pgrep", "-af", r"ray::|raylet|gcs_server"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray cluster (2 CPUs, no dashboard, no usage stats, token auth off: loopback only) in a
    temporary session folder; yields the storage folder. Shut down and checked clean afterwards."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.serve")
    if ray_processes():
        pytest.skip("another Ray cluster runs on this machine; these tests start their own")
    token = Path.home() / ".ray" / "auth_token"
    token_before = token.exists()
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    session = tempfile.mkdtemp(prefix="pfray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=session)
    try:
        yield tmp_path_factory.mktemp("ray-data")
    finally:
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        deadline = time.monotonic() + 30
        while ray_processes() and time.monotonic() < deadline:
            time.sleep(0.5)
        left = ray_processes()
        shutil.rmtree(session, ignore_errors=True)
        assert not left, f"ray processes left behind: {left[:3]}"
        assert token.exists() == token_before, "the test cluster wrote ~/.ray/auth_token"


@pytest.fixture(scope="module")
def serve_settings():
    from profusion_rt.serve import ServeConfig
    from profusion_rt.serve.ray.spec import ModelSpec, ScaleSpec

    config = ServeConfig(max_queue=2, max_batch=4, max_wait_ms=100, timeout_s=120, max_upload_bytes=1_000_000,
                         max_delta_bytes=20_000_000, max_pixels=600 * 600, steps_limit=4, default_steps=STEPS,
                         customize_steps=1, customize_steps_limit=2, customize_augmentations=1, warmup_steps=1)
    model = ModelSpec(model="tiny", weights_seed=0, threads=1)
    scale = ScaleSpec(replicas=2, subjects_per_replica=1, max_ongoing_requests=4, max_queued_requests=8,
                      num_cpus=0, customize_num_cpus=0)
    return model, scale, config


@pytest.fixture(scope="module")
def ray_app(ray_cluster, serve_settings):
    """The application on the cluster; yields its base URL."""
    from profusion_rt.serve.ray import app

    model, scale, config = serve_settings
    port = _free_port()
    start = time.perf_counter()
    app.start(model, scale, config, str(ray_cluster), host="127.0.0.1", port=port)
    print(f"\nray serve app ready in {time.perf_counter() - start:.1f} s")
    yield f"http://127.0.0.1:{port}"
