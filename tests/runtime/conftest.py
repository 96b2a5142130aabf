"""Fixtures shared by the runtime tests."""

from __future__ import annotations

import pytest
import torch


def _perturbed_delta(seed: int):
    """(base pipe, customized pipe, delta) with every delta tensor perturbed."""
    from profusion_rt.pipeline import ProFusionPipeline
    from profusion_rt.models.delta import base_fingerprint, delta_parameters
    from profusion_rt.training.delta import extract_delta

    base = ProFusionPipeline.from_preset("tiny", seed=0)
    custom = ProFusionPipeline.from_preset("tiny", seed=0)
    for pipe in (base, custom):
        pipe.progress_bar = False
    fp = base_fingerprint(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta_parameters(custom).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.02 * (p.abs().mean() + 1e-3))
    return base, custom, extract_delta(custom, fp)


@pytest.fixture
def perturbed_delta():
    """``perturbed_delta(seed)`` -> (base pipe, customized pipe, delta): fresh tiny pipelines (not the shared
    one) and a delta in which every tensor (PromptNet, the UNet's to_q/to_k/to_v) is perturbed."""
    return _perturbed_delta


@pytest.fixture(scope="session")
def stage_artifacts(tiny_pipe, tmp_path_factory):
    """The shared tiny pipeline's two stage graphs, exported once per session (legacy exporter: fast;
    symbolic batch 1..4; model.ort.onnx with fused attention beside model.opt.onnx). Read-only."""
    from profusion_rt.export.cache import export_artifacts

    root = tmp_path_factory.mktemp("stage-artifacts")
    export_artifacts(tiny_pipe, root, graphs=["fusion_stage", "refinement_stage"], validate=False, batch=1,
                     dynamic_batch=(1, 4), exporter="legacy")
    return root
