"""The onnxruntime backend (exported tiny stage graphs) against the eager reference, and delta hot-swap."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from profusion_rt.runtime import create_runtime  # noqa: E402
from profusion_rt.runtime.parity import compare  # noqa: E402

STEPS = 4
KW = dict(prompt="a {S*} wearing sunglasses", num_inference_steps=STEPS, seed=5)


@pytest.fixture(scope="module")
def ort_runtime(tiny_pipe, stage_artifacts):
    return create_runtime(tiny_pipe, "onnxruntime", artifacts=stage_artifacts)


def test_onnxruntime_matches_eager(tiny_pipe, ort_runtime, astronaut):
    ref = tiny_pipe(reference_image=astronaut, output_type="np", **KW)
    out = ort_runtime(reference_image=astronaut, output_type="np", **KW)
    parity = compare(out.latents, ref.latents, out.images, ref.images)
    assert parity.ok(latent_rel_tol=1e-4, pixel_fraction=0.99), parity


def test_onnxruntime_batches_requests(tiny_pipe, ort_runtime, astronaut):
    reqs = [dict(KW, reference_image=astronaut, seed=s, output_type="latent") for s in (1, 2, 3)]
    outs = ort_runtime.generate_batch(reqs)
    assert (3, STEPS, 1) in ort_runtime._buffers
    for req, out in zip(reqs, outs):
        ref = tiny_pipe(**req).images
        torch.testing.assert_close(out.images, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_batch_beyond_the_exported_range_is_split(ort_runtime, astronaut):
    reqs = [dict(KW, reference_image=astronaut, seed=s, num_inference_steps=2, output_type="latent")
            for s in range(5)]
    outs = ort_runtime.generate_batch(reqs)  # range 1..4: one batch of 4 and one of 1
    assert len(outs) == 5 and (4, 2, 1) in ort_runtime._buffers and (1, 2, 1) in ort_runtime._buffers


def test_missing_artifacts_is_a_typed_error(tiny_pipe, tmp_path):
    from profusion_rt.core.errors import InvalidParameterError, ModelLoadError

    with pytest.raises(ModelLoadError, match="fusion_stage"):
        create_runtime(tiny_pipe, "onnxruntime", artifacts=tmp_path)
    with pytest.raises(InvalidParameterError, match="artifact folder"):
        create_runtime(tiny_pipe, "onnxruntime")


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_delta_hot_swap_matches_the_customized_model(backend, stage_artifacts, astronaut, perturbed_delta):
    base, custom, delta = perturbed_delta(7)
    runtime = create_runtime(base, backend, artifacts=stage_artifacts)
    before = runtime(reference_image=astronaut, output_type="latent", **KW).images
    seconds = runtime.apply_delta(delta)
    assert seconds >= 0
    out = runtime(reference_image=astronaut, output_type="latent", **KW).images
    ref = custom(reference_image=astronaut, output_type="latent", **KW).images
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert (out - before).abs().max() > 1e-3  # the swap really changed the result
