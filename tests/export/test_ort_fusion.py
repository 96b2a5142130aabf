"""The onnxruntime-specific export stage: attention -> com.microsoft.MultiHeadAttention (export/ort_fusion.py)
in model.ort.onnx, next to the untouched model.opt.onnx; exact against the unfused graph and torch; patterns
that are not certain are left alone; the stage is cached like the others."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from profusion_rt.artifacts.specs import GRAPHS
from profusion_rt.artifacts.store import OPT_ONNX_FILE, ORT_ONNX_FILE, ArtifactStore, shape_key

STAGES = ["fusion_stage", "refinement_stage"]


def _entry(tiny_export, graph):
    root, builder, _ = tiny_export
    entry = ArtifactStore(root).find(builder.model_hash, graph, "fp32", shape_key(builder.pipe.resolution, 1, (1, 4)))
    assert entry is not None
    return entry


def _attention_modules(pipe, graph):
    """qualified name -> diffusers Attention module of the graph's torch module."""
    from diffusers.models.attention_processor import Attention

    return {n: m for n, m in GRAPHS[graph].build_module(pipe).named_modules() if isinstance(m, Attention)}


# -- the tiny stage graphs -------------------------------------------------------------------------------
@pytest.mark.parametrize("graph", STAGES)
def test_stage_graph_fuses_every_unmasked_attention(tiny_export, tiny_pipe, graph):
    import onnx

    entry = _entry(tiny_export, graph)
    _, _, reports = tiny_export
    modules = _attention_modules(tiny_pipe, graph)  # the UNet's and PromptNet's: 28 on tiny
    record = entry.manifest["stages"]["ort_fusion"]
    assert record["fused"] == len(modules) > 0
    assert record["files"] == [ORT_ONNX_FILE] and entry.ort_onnx_path == entry.path / ORT_ONNX_FILE
    assert reports[graph].ort_fusion["fused"] == len(modules)
    assert f"{len(modules)} attention fused" in reports[graph].summary()

    opt = onnx.load(str(entry.opt_onnx_path), load_external_data=False)
    ort = onnx.load(str(entry.ort_onnx_path), load_external_data=False)
    onnx.checker.check_model(ort)  # includes the topological order
    assert not [n for n in opt.graph.node if n.domain == "com.microsoft"]  # the neutral model is untouched
    mha = [n for n in ort.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(mha) == len(modules) and all(n.domain == "com.microsoft" for n in mha)
    assert ("com.microsoft", 1) in {(o.domain, o.version) for o in ort.opset_import}
    # each fused node has its module's head count and scale
    for node in mha:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        scope = node.name.rsplit("/", 1)[0].strip("/").replace("/", ".")
        candidates = [m for name, m in modules.items() if name == scope or name.endswith("." + scope)]
        assert candidates, node.name
        assert any(m.heads == attrs["num_heads"] and m.scale == pytest.approx(attrs["scale"], rel=1e-6)
                   for m in candidates), (node.name, attrs)

    # the softmaxes left are the text encoder's causal (masked) attention
    producers = {o: n for n in ort.graph.node for o in n.output}
    left = [n for n in ort.graph.node if n.op_type == "Softmax"]
    text_layers = tiny_pipe.text_encoder.config.num_hidden_layers - tiny_pipe.text_skip_layers  # penultimate
    assert len(left) == record["unmatched_softmax"] == text_layers
    assert all(producers[n.input[0]].op_type == "Add" for n in left)
    assert record["reasons"] == {"masked": len(left)}

    # weights keep their names; nothing left unused (onnxruntime warns per unused initializer); I/O and
    # metadata kept, plus what was fused
    used = {i for n in ort.graph.node for i in n.input}
    ort_inits = {t.name for t in ort.graph.initializer}
    assert ort_inits <= {t.name for t in opt.graph.initializer} and ort_inits <= used
    assert [i.name for i in ort.graph.input] == [i.name for i in opt.graph.input]
    assert [o.name for o in ort.graph.output] == [o.name for o in opt.graph.output]
    opt_meta = {p.key: p.value for p in opt.metadata_props}
    ort_meta = {p.key: p.value for p in ort.metadata_props}
    assert {k: ort_meta[k] for k in opt_meta} == opt_meta
    assert ort_meta["ort_fusion"].startswith(f"{len(modules)} attention -> com.microsoft.MultiHeadAttention")


@pytest.mark.parametrize("graph", STAGES)
def test_fused_graph_matches_the_unfused_one_and_torch(tiny_export, tiny_pipe, graph):
    from profusion_rt.export.validate import compare, ort_session, torch_reference

    entry = _entry(tiny_export, graph)
    spec = GRAPHS[graph]
    # export validated both files (the fused one is what onnxruntime runs)
    checked = {(c["model"], c["batch"]) for c in entry.validation["onnxruntime"]["checks"] if c["passed"]}
    assert checked == {(f, b) for f in (OPT_ONNX_FILE, ORT_ONNX_FILE) for b in (1, 2)}

    opt, ort = ort_session(entry.opt_onnx_path), ort_session(entry.ort_onnx_path)
    module = spec.build_module(tiny_pipe)
    for batch in (1, 3):  # 3: a batch the export never saw
        feeds = spec.sample_inputs(tiny_pipe, batch=batch, seed=40 + batch)
        arrays = {k: v.contiguous().numpy() for k, v in feeds.items()}
        want = opt.run(None, arrays)[0]
        got = ort.run(None, arrays)[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
        ref = torch_reference(module, spec, feeds)["x_out"]
        check = compare(spec, "fp32", "onnxruntime", batch, 0, "x_out", got, ref, 0.0, model=ORT_ONNX_FILE)
        assert check.passed, check


def test_other_graphs_get_no_ort_file(tiny_export):
    for graph in set(GRAPHS) - set(STAGES):
        entry = _entry(tiny_export, graph)
        assert "ort_fusion" not in entry.manifest["stages"] and entry.ort_onnx_path is None


# -- synthetic graphs: what must and must not be fused ---------------------------------------------------
B, S, N, H = 2, 4, 2, 4  # S == L == H, so that a wrong transpose still gives a valid graph
D = N * H


def _attention_model(*, scale="initializer", k_perm=(0, 2, 3, 1), mask=False, heads=N, heads_input=False,
                     probs_output=False, scale_overridable=False, softmax_axis=-1):
    """q, k, v [B, S, D] -> the legacy exporter's lowering of SDPA -> out [B, S, D]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    factor = np.array(H ** -0.25, dtype=np.float32)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, S, D]) for n in "qkv"]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [B, S, D])]
    # [B, -1, N, H]; with N = -1 (transformers' CLIP does this) the sequence length is given instead
    heads_shape = [0, -1, heads, H] if heads > 0 else [0, S, -1, H]
    inits = [numpy_helper.from_array(np.array(heads_shape, dtype=np.int64), "heads_shape"),
             numpy_helper.from_array(np.array([0, -1, D], dtype=np.int64), "merge_shape")]
    nodes = []
    if heads_input:  # the head count is not known
        inputs.append(helper.make_tensor_value_info("heads_shape", TensorProto.INT64, [4]))
        inits = inits[1:]
    if scale == "initializer":
        inits += [numpy_helper.from_array(factor, "sq"), numpy_helper.from_array(factor, "sk")]
        if scale_overridable:
            inputs.append(helper.make_tensor_value_info("sq", TensorProto.FLOAT, []))
    elif scale == "constant":
        nodes += [helper.make_node("Constant", [], [n], value=numpy_helper.from_array(factor)) for n in ("sq", "sk")]
    else:  # a run-time input
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, []) for n in ("sq", "sk")]
    nodes += [
        helper.make_node("Reshape", ["q", "heads_shape"], ["q4"]),
        helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
        helper.make_node("Mul", ["qt", "sq"], ["qs"]),
        helper.make_node("Reshape", ["k", "heads_shape"], ["k4"]),
        helper.make_node("Transpose", ["k4"], ["kt"], perm=list(k_perm)),
        helper.make_node("Mul", ["sk", "kt"], ["ks"]),  # either operand order
        helper.make_node("MatMul", ["qs", "ks"], ["scores"]),
    ]
    if mask:
        inits.append(numpy_helper.from_array(np.triu(np.full((S, S), -1e4, np.float32), 1), "mask"))
        nodes.append(helper.make_node("Add", ["scores", "mask"], ["masked"]))
    nodes += [
        helper.make_node("Softmax", ["masked" if mask else "scores"], ["probs"], axis=softmax_axis),
        helper.make_node("Reshape", ["v", "heads_shape"], ["v4"]),
        helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["probs", "vt"], ["att"]),
        helper.make_node("Transpose", ["att"], ["att_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["att_t", "merge_shape"], ["out"]),
    ]
    if probs_output:
        outputs.append(helper.make_tensor_value_info("probs", TensorProto.FLOAT, [B, N, S, S]))
    graph = helper.make_graph(nodes, "attention", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    entry = model.metadata_props.add()
    entry.key, entry.value = "graph", "synthetic"
    onnx.checker.check_model(model)
    return model


def _run(model, feeds):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(["out"], feeds)[0]


@pytest.mark.parametrize("variant", [dict(), dict(scale="constant"), dict(heads=-1)],
                         ids=["initializer-scale", "constant-node-scale", "heads-from-width"])
def test_the_pattern_is_fused_exactly(variant):
    import onnx

    from profusion_rt.export.ort_fusion import fuse_attention

    model = _attention_model(**variant)
    before = onnx.ModelProto()
    before.CopyFrom(model)
    result = fuse_attention(model)
    assert (result.fused, result.unmatched_softmax) == (1, 0)
    onnx.checker.check_model(model)
    [node] = model.graph.node
    assert (node.op_type, node.domain, list(node.input), list(node.output)) == (
        "MultiHeadAttention", "com.microsoft", ["q", "k", "v"], ["out"])
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["num_heads"] == N and attrs["scale"] == pytest.approx(H ** -0.5, rel=1e-6)
    assert not model.graph.initializer  # reshape targets and scales went with the nodes
    assert {p.key for p in model.metadata_props} == {"graph", "ort_fusion"}
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((B, S, D)).astype(np.float32) for n in "qkv"}
    np.testing.assert_allclose(_run(model, feeds), _run(before, feeds), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant, reason", [
    (dict(scale="input"), "query scale is not a constant scalar"),
    (dict(scale_overridable=True), "query scale is not a constant scalar"),
    (dict(k_perm=(0, 2, 1, 3)), "head transposes have other perms"),
    (dict(mask=True), "masked"),
    (dict(probs_output=True), "softmax output has other consumers"),
    (dict(heads_input=True), "query reshape target is not known"),
    (dict(softmax_axis=2), "softmax is not over the last axis"),
], ids=["scale-input", "scale-overridable", "wrong-perm", "mask", "probs-used-twice", "heads-unknown", "axis"])
def test_uncertain_patterns_are_left_alone(variant, reason):
    from profusion_rt.export.ort_fusion import fuse_attention

    model = _attention_model(**variant)
    before = model.SerializeToString()
    result = fuse_attention(model)
    assert (result.fused, result.unmatched_softmax) == (0, 1)
    assert result.reasons == {reason: 1}
    assert model.SerializeToString() == before  # untouched: no opset, metadata or initializer change


def _dynamo_attention_model(*, symbolic_batch=False, key_perms=((0, 2, 1, 3), (0, 2, 1)), key_scale="initializer",
                            shape_output=False, merged_output=False):
    """q, k, v [B, S, D] -> the dynamo exporter's lowering of SDPA after polygraphy's folding, as in the tiny
    stage graphs: the key goes ``[B, S, N, H] -> Transpose -> Reshape [B*N, S, H] -> Transpose(0,2,1) ->
    Reshape [B, N, H, S]``. ``symbolic_batch``: a ``B`` batch axis, so the reshape targets are ``[-1, S, N, H]``
    and the key's split target is ``Concat(Shape(k heads)[:-2], H, S)`` (a static batch: constants)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    batch = "B" if symbolic_batch else B
    factor = np.array(H ** -0.25, dtype=np.float32)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [batch, S, D]) for n in "qkv"]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, S, D])]
    lead = [-1, S] if symbolic_batch else [B, -1]

    def i64(name, values):
        return numpy_helper.from_array(np.array(values, dtype=np.int64), name)

    inits = [i64("heads_shape", lead + [N, H]), i64("merge_shape", [-1, S, H]), i64("out_shape", lead + [D])]
    if key_scale == "initializer":
        inits.append(numpy_helper.from_array(factor, "scale"))
    else:
        inputs.append(helper.make_tensor_value_info("scale", TensorProto.FLOAT, []))
    nodes = [helper.make_node("Reshape", [x, "heads_shape"], [f"{x}4"], allowzero=1) for x in "qkv"]
    nodes += [
        helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
        helper.make_node("Mul", ["qt", "scale"], ["qs"]),
        helper.make_node("Transpose", ["k4"], ["kt4"], perm=list(key_perms[0])),
        helper.make_node("Reshape", ["kt4", "merge_shape"], ["k3"]),
        helper.make_node("Transpose", ["k3"], ["k3t"], perm=list(key_perms[1])),
    ]
    if symbolic_batch:
        inits += [i64("lo", [np.iinfo(np.int64).min]), i64("hi", [-2]), i64("hs", [H, S])]
        nodes += [helper.make_node("Shape", ["kt4"], ["kt4_shape"]),
                  helper.make_node("Slice", ["kt4_shape", "lo", "hi"], ["bn"]),
                  helper.make_node("Concat", ["bn", "hs"], ["split_shape"], axis=0)]
        if shape_output:
            outputs.append(helper.make_tensor_value_info("kt4_shape", TensorProto.INT64, [4]))
    else:
        inits.append(i64("split_shape", [B, N, H, S]))
    nodes += [
        helper.make_node("Reshape", ["k3t", "split_shape"], ["kt"]),
        helper.make_node("Mul", ["kt", "scale"], ["ks"]),
        helper.make_node("MatMul", ["qs", "ks"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["probs", "vt"], ["att"]),
        helper.make_node("Transpose", ["att"], ["att_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["att_t", "out_shape"], ["out"], allowzero=1),
    ]
    if merged_output:
        outputs.append(helper.make_tensor_value_info("k3", TensorProto.FLOAT, [None, S, H]))
    graph = helper.make_graph(nodes, "attention", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("symbolic_batch", [False, True], ids=["static-batch", "symbolic-batch"])
def test_the_dynamo_pattern_is_fused_exactly(symbolic_batch):
    import onnx

    from profusion_rt.export.ort_fusion import fuse_attention

    model = _dynamo_attention_model(symbolic_batch=symbolic_batch)
    before = onnx.ModelProto()
    before.CopyFrom(model)
    result = fuse_attention(model)
    assert (result.fused, result.unmatched_softmax) == (1, 0)
    onnx.checker.check_model(model)
    [node] = model.graph.node  # the key's Shape -> Slice -> Concat went too
    assert (node.op_type, node.domain, list(node.input), list(node.output)) == (
        "MultiHeadAttention", "com.microsoft", ["q", "k", "v"], ["out"])
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["num_heads"] == N and attrs["scale"] == pytest.approx(H ** -0.5, rel=1e-6)
    assert not model.graph.initializer
    rng = np.random.default_rng(1)
    for batch in ((B, 3) if symbolic_batch else (B,)):
        feeds = {n: rng.standard_normal((batch, S, D)).astype(np.float32) for n in "qkv"}
        np.testing.assert_allclose(_run(model, feeds), _run(before, feeds), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant, reason", [
    (dict(key_perms=((0, 2, 1, 3), (0, 1, 2))), "head transposes have other perms"),
    (dict(key_perms=((0, 1, 2, 3), (0, 2, 1))), "head transposes have other perms"),
    (dict(key_scale="input"), "query scale is not a constant scalar"),
    (dict(merged_output=True), "merged key has other consumers"),
    (dict(symbolic_batch=True, shape_output=True), "key shape has other consumers"),
], ids=["key-not-transposed", "key-heads-not-transposed", "scale-input", "merged-key-read-twice",
        "key-shape-read-twice"])
def test_dynamo_near_misses_are_left_alone(variant, reason):
    """Valid graphs one step away from the dynamo pattern (computing something else, or needing a tensor
    the fused node would remove): left byte for byte."""
    from profusion_rt.export.ort_fusion import fuse_attention

    model = _dynamo_attention_model(**variant)
    before = model.SerializeToString()
    result = fuse_attention(model)
    assert (result.fused, result.unmatched_softmax, result.reasons) == (0, 1, {reason: 1})
    assert model.SerializeToString() == before


# -- the export stage and its cache ----------------------------------------------------------------------
def _builder(pipe, root, **overrides):
    from profusion_rt.export.cache import ArtifactBuilder, ExportOptions

    options = dict(exporter="legacy", validate=True)
    options.update(overrides)
    return ArtifactBuilder(pipe, root, ExportOptions(**options))


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def _flip_a_byte(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_the_stage_is_recorded_cached_and_rebuilt(tiny_pipe, tmp_path, monkeypatch):
    import profusion_rt.export.ort_fusion as ort_fusion

    builder = _builder(tiny_pipe, tmp_path)
    first = builder.run(["fusion_stage"], progress=False)[0]
    assert first.stages == {"onnx": "built", "optimize": "built", "ort_fusion": "built", "validate": "built"}
    manifest = json.loads((first.path / "manifest.json").read_text())
    record = manifest["stages"]["ort_fusion"]
    assert record["fused"] == 28 and record["files"] == [ORT_ONNX_FILE] and record["uses"] == []
    assert record["pass_version"] == ort_fusion.PASS_VERSION and ORT_ONNX_FILE in manifest["files"]
    assert {c["model"] for c in first.checks} == {OPT_ONNX_FILE, ORT_ONNX_FILE} and first.passed

    before = _mtimes(first.path)
    again = _builder(tiny_pipe, tmp_path).run(["fusion_stage"], progress=False)[0]
    assert again.stages == {"onnx": "cached", "optimize": "cached", "ort_fusion": "cached", "validate": "cached"}
    assert _mtimes(again.path) == before and again.ort_fusion["fused"] == 28

    # a damaged model.ort.onnx is rebuilt (and validated again); the stages before it are kept
    _flip_a_byte(first.path / ORT_ONNX_FILE)
    again = _builder(tiny_pipe, tmp_path).run(["fusion_stage"], progress=False)[0]
    assert again.stages == {"onnx": "cached", "optimize": "cached", "ort_fusion": "built", "validate": "built"}

    # a rebuilt optimized model drops and rebuilds it
    _flip_a_byte(first.path / OPT_ONNX_FILE)
    again = _builder(tiny_pipe, tmp_path).run(["fusion_stage"], progress=False)[0]
    assert again.stages == {"onnx": "cached", "optimize": "built", "ort_fusion": "built", "validate": "built"}

    # a new pass version rebuilds only this stage; when it fuses nothing the old file goes away
    monkeypatch.setattr(ort_fusion, "PASS_VERSION", "test-nothing")
    monkeypatch.setattr(ort_fusion, "_match", lambda *a: (_ for _ in ()).throw(ort_fusion._NoMatch("disabled")))
    again = _builder(tiny_pipe, tmp_path).run(["fusion_stage"], progress=False)[0]
    assert again.stages == {"onnx": "cached", "optimize": "cached", "ort_fusion": "built", "validate": "built"}
    assert again.ort_fusion == {"fused": 0, "unmatched_softmax": 31, "file": None}
    assert "0 attention fused" in again.summary() and "onnxruntime uses model.opt.onnx" in again.summary()
    assert not (again.path / ORT_ONNX_FILE).exists()
    entry = ArtifactStore(tmp_path).find(builder.model_hash, "fusion_stage", "fp32", shape_key(256, 1))
    assert entry is not None and entry.ort_onnx_path is None and entry.opt_onnx_path is not None
    assert {c["model"] for c in again.checks} == {OPT_ONNX_FILE}


def test_the_fused_model_shares_the_external_data_file(tiny_pipe, tmp_path, monkeypatch):
    import onnx

    import profusion_rt.export.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 100_000)
    report = _builder(tiny_pipe, tmp_path, dynamic_batch=(1, 2)).run(["refinement_stage"], progress=False)[0]
    assert report.passed and report.ort_fusion["fused"] == 28
    names = sorted(p.name for p in report.path.iterdir())
    assert names == ["manifest.json", "model.onnx", "model.onnx.data", "model.opt.onnx", ORT_ONNX_FILE]
    assert report.sizes[ORT_ONNX_FILE] < 1_000_000 < report.sizes["model.onnx.data"]  # no copy of the weights
    manifest = json.loads((report.path / "manifest.json").read_text())
    assert manifest["stages"]["ort_fusion"]["uses"] == ["model.onnx.data"]
    ort = onnx.load(str(report.path / ORT_ONNX_FILE), load_external_data=False)
    locations = {e.value for i in ort.graph.initializer for e in i.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}


@pytest.mark.skipif(not os.environ.get("PROFUSION_EXPORT_FULL"),
                    reason="exports the tiny stage graphs with the dynamo exporter (slow); "
                           "set PROFUSION_EXPORT_FULL=1 to run it")
@pytest.mark.parametrize("graph, dynamic_batch", [("fusion_stage", None), ("refinement_stage", (1, 2))],
                         ids=["fusion-static-batch", "refinement-symbolic-batch"])
def test_dynamo_stage_graphs_fuse_every_unmasked_attention(tiny_pipe, tmp_path, graph, dynamic_batch):
    """The dynamo exporter's lowering (the CLI default; the key through ``[B*N, L, H]`` reshapes, with a
    ``Shape -> Slice -> Concat`` target for a symbolic batch) is fused like the legacy one: every attention
    of the UNet and PromptNet, with its module's head count and scale; the fused graph equals the unfused
    one and torch within the spec's tolerance."""
    import onnx
    import torch

    from profusion_rt.export.validate import compare, ort_session, torch_reference

    report = _builder(tiny_pipe, tmp_path, exporter="dynamo", dynamic_batch=dynamic_batch).run(
        [graph], progress=False)[0]
    modules = _attention_modules(tiny_pipe, graph)
    text_layers = tiny_pipe.text_encoder.config.num_hidden_layers - tiny_pipe.text_skip_layers
    assert report.passed and report.stages["ort_fusion"] == "built"
    assert {c["model"] for c in report.checks} == {OPT_ONNX_FILE, ORT_ONNX_FILE}  # both validated vs torch
    assert report.ort_fusion == {"fused": len(modules), "unmatched_softmax": text_layers, "file": ORT_ONNX_FILE}
    manifest = json.loads((report.path / "manifest.json").read_text())
    assert manifest["stages"]["ort_fusion"]["reasons"] == {"masked": text_layers}

    ort_model = onnx.load(str(report.path / ORT_ONNX_FILE), load_external_data=False)
    onnx.checker.check_model(ort_model)
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in ort_model.graph.node if n.op_type == "MultiHeadAttention"]
    # the optimized dynamo graph's node names carry no module scopes: match (heads, scale) as multisets
    assert sorted(a["num_heads"] for a in attrs) == sorted(m.heads for m in modules.values())
    for a in attrs:
        assert any(m.heads == a["num_heads"] and m.scale == pytest.approx(a["scale"], rel=1e-6)
                   for m in modules.values()), a
    read = {i for n in ort_model.graph.node for i in n.input} | {o.name for o in ort_model.graph.output}
    assert all(set(n.output) & read for n in ort_model.graph.node)  # the key's shape reads went too

    spec = GRAPHS[graph]
    opt, ort = ort_session(report.path / OPT_ONNX_FILE), ort_session(report.path / ORT_ONNX_FILE)
    module = spec.build_module(tiny_pipe)
    for batch in ((1,) if dynamic_batch is None else (1, 2)):
        feeds = spec.sample_inputs(tiny_pipe, batch=batch, seed=60 + batch)
        arrays = {k: v.contiguous().numpy() for k, v in feeds.items()}
        unfused, fused = opt.run(None, arrays)[0], ort.run(None, arrays)[0]
        check = compare(spec, "fp32", "onnxruntime", batch, 0, "x_out", fused, torch.from_numpy(unfused), 0.0,
                        model=ORT_ONNX_FILE)
        assert check.passed, check  # fused vs unfused, the spec's tolerance
        ref = torch_reference(module, spec, feeds)["x_out"]
        for out, name in ((fused, ORT_ONNX_FILE), (unfused, OPT_ONNX_FILE)):
            check = compare(spec, "fp32", "onnxruntime", batch, 0, "x_out", out, ref, 0.0, model=name)
            assert check.passed, check
