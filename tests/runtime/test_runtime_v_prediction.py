"""v-prediction through the runtime: the torch backend (fused stage modules) and onnxruntime over the exported
stage graphs against the eager pipeline for the ``tiny-v`` preset; ε and v artifacts never mix (the model
hash covers the scheduler config). torch-compile runs the same stage modules and is left out (its first
compilation takes minutes here); the runtime from artifacts alone runs the same stage graphs (its
request preparation does not depend on the prediction type: the step tables are the same)."""

from __future__ import annotations

import pytest
import torch

from profusion_rt.runtime import create_runtime
from profusion_rt.runtime.parity import compare

STEPS = 4
KW = dict(prompt="a {S*} wearing sunglasses", num_inference_steps=STEPS, seed=5)


@pytest.fixture(scope="module")
def eager_v(tiny_v, astronaut):
    return tiny_v(reference_image=astronaut, output_type="np", **KW)


def _assert_parity(out, ref):
    parity = compare(out.latents, ref.latents, out.images, ref.images)
    assert parity.ok(latent_rel_tol=1e-4, pixel_fraction=0.99), parity
    return parity


def test_torch_backend_matches_eager_v(tiny_v, eager_v, astronaut):
    runtime = create_runtime(tiny_v, "torch")
    assert runtime.fusion_engine.module.prediction_type == "v_prediction"
    out = runtime(reference_image=astronaut, output_type="np", **KW)
    _assert_parity(out, eager_v)
    for extra in (dict(fusion_steps=2, num_inference_steps=2), dict(prompt="a photo of a cat", num_inference_steps=3)):
        kw = dict(KW, **extra)
        image = None if "{S*}" not in kw["prompt"] else astronaut
        ref = tiny_v(reference_image=image, output_type="latent", **kw).images
        got = runtime(reference_image=image, output_type="latent", **kw).images
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_the_v_runtime_is_not_the_epsilon_one(tiny_pipe, eager_v, astronaut):
    out = create_runtime(tiny_pipe, "torch")(reference_image=astronaut, output_type="np", **KW)
    assert compare(out.latents, eager_v.latents, out.images, eager_v.images).latent_max_rel > 1e-2




@pytest.fixture(scope="module")
def v_artifacts(tiny_v, tmp_path_factory):
    """The stage graphs of tiny-v (legacy exporter: the faster one; symbolic batch 1..2). Exporting is what is
    under test: about a minute on 2 quiet CPU cores."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from profusion_rt.export.cache import export_artifacts

    root = tmp_path_factory.mktemp("artifacts-v")
    export_artifacts(tiny_v, root, graphs=["fusion_stage", "refinement_stage"], validate=False, batch=1,
                     dynamic_batch=(1, 2), exporter="legacy")
    return root


def test_onnxruntime_matches_eager_v(tiny_v, eager_v, v_artifacts, astronaut):
    runtime = create_runtime(tiny_v, "onnxruntime", artifacts=v_artifacts, threads=1)
    _assert_parity(runtime(reference_image=astronaut, output_type="np", **KW), eager_v)
    kw = dict(KW, prompt="a photo of a cat")
    _assert_parity(runtime(output_type="np", **kw), tiny_v(output_type="np", **kw))


def test_runtime_json_records_the_prediction_type(tiny_v, v_artifacts):
    from profusion_rt.artifacts.store import load_runtime_metadata, model_hash

    meta = load_runtime_metadata(v_artifacts, model_hash(tiny_v))
    assert meta.scheduler["prediction_type"] == "v_prediction"


def test_epsilon_and_v_artifacts_do_not_mix(tiny_pipe, tiny_v, v_artifacts, stage_artifacts):
    from profusion_rt.artifacts.store import model_hash
    from profusion_rt.core.errors import ModelLoadError

    # same weights (same preset shapes and seed); only the scheduler's prediction type differs
    assert model_hash(tiny_pipe) != model_hash(tiny_v)
    with pytest.raises(ModelLoadError, match="fusion_stage"):
        create_runtime(tiny_v, "onnxruntime", artifacts=stage_artifacts)  # the ε model's graphs
    with pytest.raises(ModelLoadError, match="fusion_stage"):
        create_runtime(tiny_pipe, "onnxruntime", artifacts=v_artifacts)
