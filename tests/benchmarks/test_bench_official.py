"""The official-style stages (measure-only variants in benchmarks/) compute the same x as our minimal ones,
and the FLOP bookkeeping of the suite matches docs/algorithm.md, "Cost per denoising step" and profusion_rt.models.flops."""

from __future__ import annotations

import pytest
import torch

from profusion_rt.benchmarks.costs import NetworkFlops, unet_evals_per_step
from profusion_rt.benchmarks.official import official_runtime, official_stage_modules, stage_inputs_from_request

PROMPT = "a {S*} wearing sunglasses"


@pytest.fixture(scope="module")
def request_(tiny_pipe, astronaut):
    return tiny_pipe.prepare(reference_image=astronaut, prompt=PROMPT, num_inference_steps=4, fusion_steps=1, seed=3)


@pytest.mark.parametrize("step", [0, 2])
def test_official_stages_equal_minimal(tiny_pipe, request_, step):
    from profusion_rt.runtime.backends import stage_modules

    fusion_in, refinement_in = stage_inputs_from_request(request_, step)
    fusion, refinement = stage_modules(tiny_pipe)
    off_fusion, off_refinement = official_stage_modules(tiny_pipe, PROMPT)
    with torch.no_grad():
        a, b = fusion(**fusion_in), off_fusion(**fusion_in)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        a, b = refinement(**refinement_in), off_refinement(**refinement_in)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_official_stage_ignores_the_precomputed_contexts(tiny_pipe, request_):
    """The official-style stage re-encodes ∅ (and C~) itself: garbage in ``empty_context`` changes nothing."""
    fusion_in, _ = stage_inputs_from_request(request_, 1)
    off_fusion, _ = official_stage_modules(tiny_pipe, PROMPT)
    with torch.no_grad():
        a = off_fusion(**fusion_in)
        b = off_fusion(**dict(fusion_in, empty_context=torch.randn_like(fusion_in["empty_context"])))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_official_runtime_end_to_end_equals_torch_backend(tiny_pipe, astronaut):
    from profusion_rt.runtime import create_runtime

    kw = dict(reference_image=astronaut, prompt=PROMPT, num_inference_steps=3, fusion_steps=2, seed=1,
              output_type="latent")
    minimal = create_runtime(tiny_pipe, "torch", use_cuda_graph=False)(**kw).latents
    official = official_runtime(tiny_pipe, PROMPT)(**kw).latents
    torch.testing.assert_close(official, minimal, rtol=1e-4, atol=1e-5)


def test_image_flops_match_profusion_flops():
    from profusion_rt.models.flops import count_network_costs, sample_flops
    from profusion_rt.models.factory import build_components
    from profusion_rt.core.presets import get_preset

    preset = get_preset("tiny")
    costs = count_network_costs(build_components(preset, device="meta"), preset.resolution)
    nf = NetworkFlops.count("tiny")
    assert nf.as_dict() == {c.name: c.flops for c in costs}
    for steps, r in ((10, 0), (10, 1), (50, 2)):
        assert nf.image(steps, r, "minimal") == sample_flops(costs, steps, r)
    # official-style does strictly more work; plain SD2 strictly less
    assert nf.image(10, 1, "official") > nf.image(10, 1, "minimal") > nf.image(10, 1, "plain")
    assert nf.image(10, 1, "minimal", batch=3) == 3 * nf.image(10, 1, "minimal")
    assert nf.graph("unet", 2) == 2 * nf.unet
    assert nf.graph("fusion_stage_official") - nf.graph("fusion_stage") == nf.unet + 2 * nf.text_encoder


def test_unet_evals_per_step_follow_profusion_section_7():
    assert unet_evals_per_step("plain", 0, False) == "1 x 2"
    assert unet_evals_per_step("minimal", 0, False) == "1 x 2"
    assert unet_evals_per_step("minimal", 0, True) == "1 x 3"
    assert unet_evals_per_step("minimal", 1, True) == "1 x 2 + 1 x 3"
    assert unet_evals_per_step("official", 1, True) == "2 x 3"


def test_preset_at_resolution_keeps_one_token(tiny_pipe):
    from profusion_rt.benchmarks.models import build_pipeline

    pipe = build_pipeline("tiny", resolution=128)
    assert pipe.resolution == 128 and pipe.latent_shape == (4, 16, 16)
    x = torch.zeros(1, 4, 16, 16)
    tokens = torch.zeros(1, 17, 64)
    with torch.no_grad():
        s_star = pipe.promptnet(x, torch.tensor([10]), tokens, x)
    assert s_star.shape == (1, 1, 64)
    # the preset's own resolution builds exactly the tests' pipeline
    same = build_pipeline("tiny")
    torch.testing.assert_close(next(same.unet.parameters()), next(tiny_pipe.unet.parameters()))
