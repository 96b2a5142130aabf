"""The onnxruntime backend loads model.ort.onnx (attention fused into com.microsoft.MultiHeadAttention) when
the export wrote one, matches the eager pipeline and the unfused graphs, and still hot-swaps a delta."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from profusion_rt.artifacts.store import ORT_ONNX_FILE, model_hash  # noqa: E402
from profusion_rt.runtime import create_runtime  # noqa: E402
from profusion_rt.runtime.backends import select_artifact  # noqa: E402
from profusion_rt.runtime.parity import compare  # noqa: E402

STEPS = 3
KW = dict(prompt="a {S*} wearing sunglasses", num_inference_steps=STEPS, seed=11)
STAGES = ("fusion_stage", "refinement_stage")


def test_runtime_runs_the_fused_graphs_and_matches_eager(tiny_pipe, stage_artifacts, astronaut):
    digest = model_hash(tiny_pipe)
    entries = [select_artifact(stage_artifacts, digest, g, "fp32") for g in STAGES]
    assert all(e.ort_onnx_path is not None and e.ort_onnx_path.is_file() for e in entries)
    runtime = create_runtime(tiny_pipe, "onnxruntime", artifacts=stage_artifacts)
    engines = (runtime.fusion_engine, runtime.refinement_engine)
    assert [e.path for e in engines] == [e.ort_onnx_path for e in entries]
    assert all(e.path.name == ORT_ONNX_FILE for e in engines)

    ref = tiny_pipe(reference_image=astronaut, output_type="np", **KW)
    out = runtime(reference_image=astronaut, output_type="np", **KW)
    parity = compare(out.latents, ref.latents, out.images, ref.images)
    assert parity.ok(latent_rel_tol=1e-4, pixel_fraction=0.99), parity


def test_fused_and_unfused_graphs_give_the_same_images(tiny_pipe, stage_artifacts, astronaut):
    from profusion_rt.runtime.ort_engine import OrtEngine
    from profusion_rt.runtime.runtime import Runtime

    digest = model_hash(tiny_pipe)
    entries = [select_artifact(stage_artifacts, digest, g, "fp32") for g in STAGES]
    unfused = Runtime(tiny_pipe, *(OrtEngine(e.opt_onnx_path, batch_range=e.dynamic_batch) for e in entries),
                      backend="onnxruntime")
    fused = create_runtime(tiny_pipe, "onnxruntime", artifacts=stage_artifacts)
    reqs = [dict(KW, reference_image=astronaut, seed=s, output_type="latent") for s in (1, 2)]
    for a, b in zip(fused.generate_batch(reqs), unfused.generate_batch(reqs)):
        torch.testing.assert_close(a.images, b.images, rtol=1e-5, atol=1e-5 * float(b.images.abs().max()))


def test_delta_hot_swap_on_the_fused_graphs(stage_artifacts, astronaut, perturbed_delta):
    base, custom, delta = perturbed_delta(3)
    runtime = create_runtime(base, "onnxruntime", artifacts=stage_artifacts)
    assert runtime.fusion_engine.path.name == ORT_ONNX_FILE
    before = runtime(reference_image=astronaut, output_type="latent", **KW).images
    runtime.apply_delta(delta)
    # the swapped weights were all found in model.ort.onnx, the attention projections among them
    located = runtime.fusion_engine._weight_map
    assert any(k.endswith("attn1.to_q.weight") for k in located) and any(k.endswith("attn2.to_v.weight") for k in located)
    out = runtime(reference_image=astronaut, output_type="latent", **KW).images
    ref = custom(reference_image=astronaut, output_type="latent", **KW).images
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert (out - before).abs().max() > 1e-3  # the swap really changed the result
