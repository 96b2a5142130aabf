"""Shared fixtures: the tiny preset pipeline (built once per session) and a reference photo."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    # The test machine's few cores are shared: torch's default intra-op thread pool oversubscribes them and
    # runs tens of times slower under load. One thread unless PROFUSION_TEST_THREADS says otherwise.
    import torch

    torch.set_num_threads(int(os.environ.get("PROFUSION_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_pipe():
    """``ProFusionPipeline.from_preset("tiny", seed=0)``, progress bar off. Shared: do not modify it."""
    from profusion_rt.pipeline import ProFusionPipeline

    pipe = ProFusionPipeline.from_preset("tiny", seed=0)
    pipe.progress_bar = False
    return pipe


@pytest.fixture(scope="session")
def astronaut():
    """skimage's astronaut photo, (512, 512, 3) uint8."""
    from skimage import data

    return data.astronaut()
