"""Every graph of the tiny preset exports to ONNX and validates on onnxruntime; the fused stage graphs
reproduce the eager pipeline's step; the batch axis is really symbolic."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from profusion_rt.artifacts.specs import GRAPHS
from profusion_rt.artifacts.store import ONNX_FILE, OPT_ONNX_FILE, ORT_ONNX_FILE, ArtifactStore, shape_key

GRAPH_NAMES = list(GRAPHS)
#: graphs that also get model.ort.onnx (attention fused for onnxruntime; tests/export/test_ort_fusion.py)
ORT_GRAPHS = ("fusion_stage", "refinement_stage")


def _entry(tiny_export, graph):
    root, builder, _ = tiny_export
    key = shape_key(builder.pipe.resolution, 1, (1, 4))
    entry = ArtifactStore(root).find(builder.model_hash, graph, "fp32", key)
    assert entry is not None
    return entry


@pytest.mark.parametrize("graph", GRAPH_NAMES)
def test_graph_exports_and_validates(tiny_export, graph):
    _, _, reports = tiny_export
    report = reports[graph]
    fused = {"ort_fusion": "built"} if graph in ORT_GRAPHS else {}
    assert report.stages == {"onnx": "built", "optimize": "built", **fused, "validate": "built"}
    assert {c["batch"] for c in report.checks} == {1, 2}
    outputs = {c["output"] for c in report.checks}
    assert outputs == set(GRAPHS[graph].output_names)
    for c in report.checks:
        assert c["passed"] and c["finite"], c
        assert c["ratio"] <= 1.0
    entry = _entry(tiny_export, graph)
    assert entry.validation["onnxruntime"]["passed"]
    assert set(entry.files) == {ONNX_FILE, OPT_ONNX_FILE, *([ORT_ONNX_FILE] if fused else [])}
    for name in ("torch", "onnx", "onnxruntime", "tensorrt"):
        assert name in entry.manifest["versions"]
    assert entry.manifest["opset"] == 18
    assert entry.spec_hash == GRAPHS[graph].spec_hash()


@pytest.mark.parametrize("graph", GRAPH_NAMES)
def test_onnx_io_matches_spec_with_symbolic_batch(tiny_export, graph):
    import onnx

    spec = GRAPHS[graph]
    entry = _entry(tiny_export, graph)
    model = onnx.load(str(entry.opt_onnx_path), load_external_data=False)
    assert [i.name for i in model.graph.input] == list(spec.input_names)
    assert [o.name for o in model.graph.output] == list(spec.output_names)
    axes = spec.batch_axes()
    shapes = spec.resolve_shapes(entry.manifest["dims"], 1)
    for vi in (*model.graph.input, *model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        assert len(dims) == len(shapes[vi.name])
        for i, d in enumerate(dims):
            if vi.name in axes and i == axes[vi.name]:
                assert d.dim_param == "B", (vi.name, d)
            elif vi in model.graph.input:
                assert d.dim_value == shapes[vi.name][i], (vi.name, i, d)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["graph"] == graph and meta["spec_hash"] == spec.spec_hash()


def test_batch_three_on_a_graph_exported_at_batch_one(tiny_export, tiny_pipe):
    """The UNet's batch axis stays symbolic through export and optimization (batch 3 was never seen)."""
    from profusion_rt.export.validate import ort_session, torch_reference

    spec = GRAPHS["unet"]
    entry = _entry(tiny_export, "unet")
    assert entry.batch == 1
    feeds = spec.sample_inputs(tiny_pipe, batch=3, seed=7)
    got = ort_session(entry.opt_onnx_path).run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    ref = torch_reference(spec.build_module(tiny_pipe), spec, feeds)["eps"]
    assert got.shape == (3, 4, 32, 32)
    np.testing.assert_allclose(got, ref.numpy(), atol=spec.tolerance[0], rtol=spec.tolerance[1])


# -- the fused stage graphs against the eager pipeline ----------------------------------------------------
def _run(entry, feeds):
    from profusion_rt.export.validate import ort_session

    sess = ort_session(entry.opt_onnx_path)
    return torch.from_numpy(sess.run(None, {k: v.contiguous().numpy() for k, v in feeds.items()})[0])


def _stage_feeds(req, i, stage):
    feeds = {
        "x": req.latents,
        "timestep": req.tables.timesteps[i:i + 1],
        "scalars": (req.tables.fusion if stage == "fusion" else req.tables.refinement)[i],
        "ref_latents": req.reference.latents,
        "image_tokens": req.reference.image_tokens,
        "token_embeds": req.prompts.embeds,
        "placeholder_mask": req.prompts.placeholder_mask,
        "empty_context": req.prompts.empty,
    }
    if stage == "fusion":
        feeds["noise"] = req.noise[i, 0]
    else:
        feeds["class_context"] = req.prompts.class_context
    return {k: v.contiguous() for k, v in feeds.items()}


@pytest.mark.parametrize("batch", [1, 2])
def test_stage_graphs_reproduce_one_eager_step(tiny_export, tiny_pipe, astronaut, batch):
    """fusion_stage then refinement_stage on the real inputs of a request equals pipe.denoise over the
    first step of a 50-step schedule (t = 981), and each graph equals its torch module."""
    from profusion_rt.models.stages import FusionStage, RefinementStage, StepTables

    pipe = tiny_pipe
    req = pipe.prepare(reference_image=astronaut, prompt="a {S*} wearing sunglasses", num_inference_steps=50,
                       fusion_steps=1, seed=3, num_images_per_prompt=batch)
    tab = req.tables
    first = dataclasses.replace(req, tables=StepTables(tab.timesteps[:1], tab.fusion[:1], tab.refinement[:1]),
                                noise=req.noise[:1])
    eager = pipe.denoise(first)

    fusion, refinement = _entry(tiny_export, "fusion_stage"), _entry(tiny_export, "refinement_stage")
    feeds = _stage_feeds(req, 0, "fusion")
    x_fused = _run(fusion, feeds)
    with torch.no_grad():
        torch_fused = FusionStage(pipe.unet, pipe.text_encoder, pipe.promptnet, pipe.text_skip_layers)(**feeds)
    atol, rtol = GRAPHS["fusion_stage"].tolerance
    torch.testing.assert_close(x_fused, torch_fused, atol=atol, rtol=rtol)

    feeds = _stage_feeds(dataclasses.replace(req, latents=x_fused), 0, "refinement")
    x_next = _run(refinement, feeds)
    with torch.no_grad():
        torch_next = RefinementStage(pipe.unet, pipe.text_encoder, pipe.promptnet, pipe.text_skip_layers)(**feeds)
    atol, rtol = GRAPHS["refinement_stage"].tolerance
    torch.testing.assert_close(x_next, torch_next, atol=atol, rtol=rtol)
    torch.testing.assert_close(x_next, eager, atol=atol, rtol=rtol)
    assert not torch.equal(x_next, req.latents)  # the step did something
