"""The runtime's torch backends against the eager reference pipeline, on the same seeds (tiny, CPU)."""

from __future__ import annotations

import pytest
import torch

from profusion_rt.runtime import create_runtime
from profusion_rt.runtime.parity import compare

STEPS = 6
KW = dict(prompt="a {S*} wearing sunglasses", num_inference_steps=STEPS, seed=3)


@pytest.fixture(scope="module")
def eager(tiny_pipe, astronaut):
    out = tiny_pipe(reference_image=astronaut, output_type="np", **KW)
    return out


@pytest.fixture(scope="module")
def torch_runtime(tiny_pipe):
    return create_runtime(tiny_pipe, "torch")


def _check(runtime, eager, astronaut, **extra):
    out = runtime(reference_image=astronaut, output_type="np", **dict(KW, **extra))
    parity = compare(out.latents, eager.latents, out.images, eager.images)
    assert parity.ok(1e-4, 0.99), parity
    return out, parity


def test_torch_backend_matches_eager(torch_runtime, eager, astronaut):
    out, parity = _check(torch_runtime, eager, astronaut)
    # Same modules and math; only the UNet's shared prefix is computed once instead of k times, which
    # changes float rounding (not bit-identical since then), far inside the parity bound.
    assert parity.latent_max_rel <= 1e-5, parity
    assert out.seeds == eager.seeds


def test_static_buffers_are_reused(torch_runtime, astronaut, eager):
    torch_runtime(reference_image=astronaut, output_type="latent", **KW)
    buffers = dict(torch_runtime._buffers)
    ptrs = {k: b.tensors["x_a"].data_ptr() for k, b in buffers.items()}
    torch_runtime(reference_image=astronaut, output_type="latent", **dict(KW, seed=11))
    assert {k: b.tensors["x_a"].data_ptr() for k, b in torch_runtime._buffers.items()} == ptrs


@pytest.mark.parametrize("extra", [
    dict(fusion_steps=0),
    dict(fusion_steps=2),
    dict(reference_guidance_scale=0.0),
    dict(fusion_eta=0.5, fusion_embedding_scale=0.8, guidance_scale=4.0),
])
def test_torch_backend_matches_eager_across_parameters(tiny_pipe, torch_runtime, astronaut, extra):
    kw = dict(KW, **extra, num_inference_steps=3)
    ref = tiny_pipe(reference_image=astronaut, output_type="latent", **kw).images
    out = torch_runtime(reference_image=astronaut, output_type="latent", **kw).images
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_plain_sd2_request_runs_through_the_stage_graphs(tiny_pipe, torch_runtime):
    kw = dict(prompt="a photo of a cat", num_inference_steps=3, seed=1)
    ref = tiny_pipe(output_type="latent", **kw).images
    out = torch_runtime(output_type="latent", **kw).images
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_requests_of_the_same_shape_batch_together(tiny_pipe, torch_runtime, astronaut):
    kw = dict(KW, num_inference_steps=3)
    reqs = [dict(kw, reference_image=astronaut, seed=1, output_type="latent"),
            dict(kw, reference_image=astronaut, seed=2, prompt="a {S*} in a forest", output_type="latent"),
            dict(kw, reference_image=astronaut, seed=3, guidance_scale=3.0, output_type="latent")]
    outs = torch_runtime.generate_batch(reqs)
    # the first two share one batched loop of batch 2; the third (other parameters) runs alone
    assert (2, 3, 1) in torch_runtime._buffers and (1, 3, 1) in torch_runtime._buffers
    for req, out in zip(reqs, outs):
        ref = tiny_pipe(**req).images
        torch.testing.assert_close(out.images, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
        assert out.seeds == [req["seed"]]


def test_unknown_backend_is_a_typed_error(tiny_pipe):
    from profusion_rt.core.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="unknown backend"):
        create_runtime(tiny_pipe, "nosuch")


def test_cuda_graph_needs_cuda(tiny_pipe):
    from profusion_rt.core.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="CUDA"):
        create_runtime(tiny_pipe, "torch", use_cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA-graph capture and replay)")
def test_cuda_graph_replay_matches_eager(astronaut):
    from profusion_rt.pipeline import ProFusionPipeline

    pipe = ProFusionPipeline.from_preset("tiny", seed=0, device="cuda")
    pipe.progress_bar = False
    ref = pipe(reference_image=astronaut, output_type="latent", **KW).images
    runtime = create_runtime(pipe, "torch", use_cuda_graph=True)
    for seed in (3, 3):  # capture, then replay
        out = runtime(reference_image=astronaut, output_type="latent", **dict(KW, seed=seed)).images
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_tensorrt_missing_is_a_clear_error(tiny_pipe, tmp_path):
    import importlib.util

    from profusion_rt.core.errors import BackendUnavailableError

    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are present: the gate does not apply")
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed|needs a CUDA GPU") as info:
        create_runtime(tiny_pipe, "tensorrt", artifacts=tmp_path)
    assert "\n" not in str(info.value)
