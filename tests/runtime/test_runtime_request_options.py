"""Per-request options of the runtime: ``negative_prompt`` (a per-request constant context: no new graph
inputs) against the eager pipeline on the torch and onnxruntime backends; ``progress_callback``; and
diffusers' ``callback_on_step_end``, which the captured loop refuses with a typed error."""

from __future__ import annotations

import pytest
import torch

from profusion_rt.core.errors import InvalidParameterError
from profusion_rt.runtime import create_runtime
from profusion_rt.runtime.parity import compare

NEGATIVE = "blurry, low quality, cartoon"
KW = dict(prompt="a {S*} wearing sunglasses", num_inference_steps=3, seed=6)


@pytest.fixture(scope="module")
def torch_runtime(tiny_pipe):
    return create_runtime(tiny_pipe, "torch")


def test_negative_prompt_torch_backend_matches_eager(tiny_pipe, torch_runtime, astronaut):
    ref = tiny_pipe(reference_image=astronaut, negative_prompt=NEGATIVE, output_type="np", **KW)
    out = torch_runtime(reference_image=astronaut, negative_prompt=NEGATIVE, output_type="np", **KW)
    assert compare(out.latents, ref.latents, out.images, ref.images).ok(1e-4, 0.99)
    plain = torch_runtime(reference_image=astronaut, output_type="latent", **KW).latents
    assert (plain - out.latents).abs().max() > 1e-2


def test_requests_with_different_negative_prompts_batch_together(tiny_pipe, torch_runtime, astronaut):
    reqs = [dict(KW, reference_image=astronaut, negative_prompt=NEGATIVE, output_type="latent"),
            dict(KW, reference_image=astronaut, seed=7, output_type="latent"),
            dict(KW, reference_image=astronaut, seed=8, negative_prompt="ugly", output_type="latent")]
    torch_runtime._buffers.clear()
    outs = torch_runtime.generate_batch(reqs)
    assert list(torch_runtime._buffers) == [(3, 3, 1)]  # one loop of batch 3
    for req, out in zip(reqs, outs):
        ref = tiny_pipe(**req).images
        torch.testing.assert_close(out.images, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_negative_prompt_onnxruntime_matches_eager(tiny_pipe, stage_artifacts, astronaut):
    pytest.importorskip("onnxruntime")
    runtime = create_runtime(tiny_pipe, "onnxruntime", artifacts=stage_artifacts, threads=1)
    for kw in (dict(KW, reference_image=astronaut), dict(KW, prompt="a photo of a cat")):
        ref = tiny_pipe(negative_prompt=NEGATIVE, output_type="np", **kw)
        out = runtime(negative_prompt=NEGATIVE, output_type="np", **kw)
        parity = compare(out.latents, ref.latents, out.images, ref.images)
        assert parity.ok(1e-4, 0.99), parity


def test_progress_callback_per_step(torch_runtime, astronaut):
    seen: dict[str, list] = {"a": [], "b": []}
    reqs = [dict(KW, reference_image=astronaut, output_type="latent", fusion_steps=2,
                 progress_callback=lambda d, n, k=k: seen[k].append((d, n))) for k in seen]
    torch_runtime.generate_batch(reqs)  # one batched loop: both requests hear every step
    assert seen == {"a": [(1, 3), (2, 3), (3, 3)], "b": [(1, 3), (2, 3), (3, 3)]}


@pytest.mark.parametrize("kwargs, match", [
    (dict(callback_on_step_end=lambda *a: {}), "progress_callback"),
    (dict(callback_on_step_end_tensor_inputs=["latents"]), "no per-step hook"),
    (dict(progress_callback=3), "must be callable"),
])
def test_step_callbacks_are_refused(torch_runtime, astronaut, kwargs, match):
    with pytest.raises(InvalidParameterError, match=match) as info:
        torch_runtime(reference_image=astronaut, output_type="latent", **dict(KW, **kwargs))
    assert "\n" not in str(info.value)


def test_negative_prompt_errors_through_the_runtime(torch_runtime):
    from profusion_rt.core.errors import PromptError

    with pytest.raises(PromptError, match="negative_prompt"):
        torch_runtime(prompt="a cat", negative_prompt="very " * 80, num_inference_steps=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA-graph replay)")
def test_progress_callback_once_after_a_cuda_graph_replay(astronaut):
    from profusion_rt.pipeline import ProFusionPipeline

    pipe = ProFusionPipeline.from_preset("tiny", seed=0, device="cuda")
    pipe.progress_bar = False
    runtime = create_runtime(pipe, "torch", use_cuda_graph=True)
    seen = []
    for _ in range(2):  # capture, then replay
        runtime(reference_image=astronaut, output_type="latent", progress_callback=lambda d, n: seen.append((d, n)),
                **KW)
    assert seen == [(3, 3), (3, 3)]
