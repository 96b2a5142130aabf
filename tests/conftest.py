"""Shared fixtures: the tiny preset pipeline (built once per session) and a reference photo."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    # The test machine's few cores are shared: torch's default intra-op thread pool oversubscribes them and
    # runs tens of times slower under load. One thread unless PROFUSION_TEST_THREADS says otherwise.
    import torch

    torch.set_num_threads(int(os.environ.get("PROFUSION_TEST_THREADS", "1")))


_SHARED: dict = {}


@pytest.fixture(scope="session")
def tiny_v():
    """``ProFusionPipeline.from_preset("tiny-v", seed=0)`` (v-prediction), progress bar off; do not modify it."""
    from profusion_rt.pipeline import ProFusionPipeline

    pipe = ProFusionPipeline.from_preset("tiny-v", seed=0)
    pipe.progress_bar = False
    return pipe


@pytest.fixture(scope="session")
def tiny_pipe():
    """``ProFusionPipeline.from_preset("tiny", seed=0)``, progress bar off. Shared: do not modify it (a
    module-level guard fails the module that does)."""
    from profusion_rt.pipeline import ProFusionPipeline

    pipe = ProFusionPipeline.from_preset("tiny", seed=0)
    pipe.progress_bar = False
    _SHARED["pipe"] = pipe
    _SHARED["state"] = _snapshot(pipe)
    return pipe


def _snapshot(pipe) -> dict:
    from profusion_rt.artifacts.store import model_hash

    state = {f"{name}.{k}": v.detach().clone() for name, net in pipe.networks().items()
             for k, v in net.state_dict().items()}
    state["model_hash"] = model_hash(pipe)  # also covers configs, scheduler and tokenizer
    return state


@pytest.fixture(scope="module", autouse=True)
def _shared_pipe_unchanged(request):
    yield
    pipe = _SHARED.get("pipe")
    if pipe is None:
        return
    import torch

    now = _snapshot(pipe)
    changed = [k for k, v in _SHARED["state"].items()
               if k not in now or (now[k] != v if isinstance(v, str) else not torch.equal(now[k], v))]
    if changed:
        _SHARED["state"] = now  # report once, in the module that changed it
        pytest.fail(f"{request.module.__name__} modified the shared tiny_pipe ({len(changed)} tensors, "
                    f"e.g. {changed[0]}): use a copy", pytrace=False)


@pytest.fixture(scope="session")
def astronaut():
    """skimage's astronaut photo, (512, 512, 3) uint8."""
    from skimage import data

    return data.astronaut()
