"""Random weights are announced: one warning line in generate, serve, export and demo; /healthz and the PNG
metadata say ``random (preset tiny)``; loaded weights are not announced."""

from __future__ import annotations

import io
import logging

import pytest
from PIL import Image

from profusion_rt.cli import main
from profusion_rt.core.errors import ProFusionError
from profusion_rt.core.presets import RANDOM_WEIGHTS_WARNING, has_random_weights, weights_label

LINE = RANDOM_WEIGHTS_WARNING.format(name="tiny")


def _announcements(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "RANDOM weights" in r.getMessage()]


def test_flag_and_label(tiny_pipe):
    assert tiny_pipe.random_weights is True and has_random_weights(tiny_pipe)
    assert weights_label(tiny_pipe) == "random (preset tiny)"

    class Loaded:  # a pipeline from a model folder: the class default
        preset = "tiny"
        random_weights = False
    assert not has_random_weights(Loaded()) and weights_label(Loaded()) == "loaded"

    class FromArtifacts:  # a runtime from artifacts alone does not know
        preset = "tiny"
    assert weights_label(FromArtifacts()) == "not recorded (exported from preset tiny)"

    class Runtime:  # a runtime is labelled by its pipeline
        pipe = tiny_pipe
    assert weights_label(Runtime()) == "random (preset tiny)"


@pytest.fixture
def reference_png(tmp_path, astronaut):
    path = tmp_path / "ref.png"
    Image.fromarray(astronaut).resize((64, 64)).save(path)
    return path


def test_generate_announces_once_and_writes_metadata(tmp_path, reference_png, caplog):
    out = tmp_path / "out.png"
    with caplog.at_level(logging.WARNING):
        rc = main(["generate", "--model", "tiny", "--image", str(reference_png), "--prompt", "a {S*}",
                   "--steps", "1", "--out", str(out)])
    assert rc == 0
    assert _announcements(caplog) == [LINE]
    text = Image.open(out).text
    assert text["weights"] == "random (preset tiny)" and text["prompt"] == "a {S*}" and text["seed"] == "0"


def test_export_announces_once(tmp_path, caplog, monkeypatch):
    import profusion_rt.export.cache

    monkeypatch.setattr(profusion_rt.export.cache.ArtifactBuilder, "run", lambda self, *a, **k: [])
    with caplog.at_level(logging.WARNING):
        assert main(["export", "--model", "tiny", "--out", str(tmp_path), "--no-progress"]) == 0
    assert _announcements(caplog) == [LINE]


def test_serve_announces_once(tmp_path, caplog, monkeypatch):
    pytest.importorskip("uvicorn")
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda self: None)
    with caplog.at_level(logging.WARNING):
        assert main(["serve", "--model", "tiny", "--data", str(tmp_path / "data"), "--log-level", "warning"]) == 0
    assert _announcements(caplog) == [LINE]


def test_demo_announces_once(tmp_path, caplog, monkeypatch):
    import profusion_rt.demo

    class Stop(ProFusionError):
        pass

    def stop(*_args, **_kwargs):
        raise Stop("stopped after the announcement")

    monkeypatch.setattr(profusion_rt.demo, "export_demo_artifacts", stop)
    with caplog.at_level(logging.WARNING):
        assert main(["demo", "--out", str(tmp_path)]) == 2
    assert _announcements(caplog) == [LINE]


def test_healthz_and_served_png_say_random(tiny_pipe, tmp_path, astronaut):
    pytest.importorskip("fastapi")
    import copy

    from fastapi.testclient import TestClient

    from profusion_rt.runtime import create_runtime
    from profusion_rt.serve import ServeConfig, create_app

    pipe = copy.deepcopy(tiny_pipe)  # the server owns its pipeline; the shared one stays untouched
    app = create_app(create_runtime(pipe, "torch"), ServeConfig(data_dir=tmp_path, warmup_steps=0))
    buf = io.BytesIO()
    Image.fromarray(astronaut).resize((64, 64)).save(buf, format="PNG")
    with TestClient(app) as client:
        assert client.get("/healthz").json()["weights"] == "random (preset tiny)"
        r = client.post("/v1/generate", files={"image": ("ref.png", buf.getvalue(), "image/png")},
                        data={"prompt": "a {S*}", "num_inference_steps": "1", "seed": "0"})
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(r.content)).text["weights"] == "random (preset tiny)"
