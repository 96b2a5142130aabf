"""Weights over the protobuf limit go to one external data file next to the model (the limit is lowered
here so that tiny graphs cross it), through export, optimization (which shares the data file instead of
loading and copying the weights), hashing and onnxruntime."""

from __future__ import annotations

import pytest

from profusion_rt.artifacts.store import ArtifactStore, shape_key


@pytest.mark.parametrize("graph, exporter", [("text_encoder", "legacy"), ("text_encoder_placeholder", "dynamo")])
def test_external_data_above_the_limit(tiny_pipe, tmp_path, monkeypatch, graph, exporter):
    import profusion_rt.export.onnx_export as onnx_export
    from profusion_rt.export.cache import ArtifactBuilder, ExportOptions

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 100_000)
    builder = ArtifactBuilder(tiny_pipe, tmp_path, ExportOptions(exporter=exporter, validate=True))
    report = builder.run([graph], progress=False)[0]
    assert report.passed
    names = sorted(p.name for p in report.path.iterdir())
    assert names == ["manifest.json", "model.onnx", "model.onnx.data", "model.opt.onnx"]
    assert report.sizes["model.onnx.data"] > max(100_000, report.sizes["model.onnx"])
    entry = ArtifactStore(tmp_path).find(builder.model_hash, graph, "fp32", shape_key(256, 1))
    assert entry is not None and set(entry.files) == set(names) - {"manifest.json"}

    assert entry.manifest["stages"]["optimize"]["uses"] == ["model.onnx.data"]
    import onnx

    opt = onnx.load(str(entry.opt_onnx_path), load_external_data=False)
    locations = {e.value for i in opt.graph.initializer for e in i.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}

    # a damaged data file is caught like any other, and everything that reads it is rebuilt
    data = report.path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-8])
    assert ArtifactStore(tmp_path).find(builder.model_hash, graph, "fp32", shape_key(256, 1)) is None
    again = builder.run([graph], progress=False)[0]
    assert again.stages == {"onnx": "built", "optimize": "built", "validate": "built"} and again.passed
