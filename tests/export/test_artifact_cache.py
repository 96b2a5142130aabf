"""The artifact cache: hits skip every stage, changed inputs rebuild, damaged files are detected by hash
and rebuilt, writes are atomic, and a runtime can read what it needs without the weights."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging

import pytest
import torch

from profusion_rt.artifacts.specs import GRAPHS
from profusion_rt.artifacts.store import (ONNX_FILE, OPT_ONNX_FILE, ArtifactStore, load_runtime_metadata, model_hash,
                                          shape_key)
from profusion_rt.core.fsio import atomic_write_bytes

GRAPH = "text_encoder_placeholder"  # the smallest graph: exports in about a second


def _builder(pipe, root, digest=None, **overrides):
    from profusion_rt.export.cache import ArtifactBuilder, ExportOptions

    options = dict(exporter="legacy", validate=True)
    options.update(overrides)
    return ArtifactBuilder(pipe, root, ExportOptions(**options), model_hash_=digest)


def _mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


@pytest.fixture(scope="module")
def digest(tiny_pipe):
    return model_hash(tiny_pipe)


def test_model_hash_is_deterministic_and_sensitive(tiny_pipe, digest):
    assert model_hash(tiny_pipe) == digest and len(digest) == 16
    changed = copy.copy(tiny_pipe)
    changed.text_encoder = copy.deepcopy(tiny_pipe.text_encoder)
    with torch.no_grad():
        changed.text_encoder.final_layer_norm.weight[0] += 1e-3
    assert model_hash(changed) != digest
    skip = copy.copy(tiny_pipe)
    skip.text_skip_layers = 2
    assert model_hash(skip) != digest


def test_second_export_is_a_cache_hit(tiny_pipe, digest, tmp_path):
    first = _builder(tiny_pipe, tmp_path, digest).run([GRAPH], progress=False)[0]
    assert first.stages == {"onnx": "built", "optimize": "built", "validate": "built"}
    before = _mtimes(first.path)
    second = _builder(tiny_pipe, tmp_path, digest).run([GRAPH], progress=False)[0]
    assert second.stages == {"onnx": "cached", "optimize": "cached", "validate": "cached"}
    assert _mtimes(second.path) == before
    assert all(c.get("cached") and c["passed"] for c in second.checks)
    assert not list(tmp_path.rglob(".staging-*")) and not list(tmp_path.rglob("*.tmp"))


def test_changed_weights_spec_or_toolchain_rebuild(tiny_pipe, digest, tmp_path):
    _builder(tiny_pipe, tmp_path, digest, validate=False).run([GRAPH], progress=False)

    # other weights: another model hash, so a new artifact; the old one stays valid
    changed = copy.copy(tiny_pipe)
    changed.text_encoder = copy.deepcopy(tiny_pipe.text_encoder)
    with torch.no_grad():
        changed.text_encoder.encoder.layers[0].mlp.fc1.weight.mul_(1.01)
    report = _builder(changed, tmp_path, validate=False).run([GRAPH], progress=False)[0]
    assert report.stages == {"onnx": "built", "optimize": "built"}
    assert model_hash(changed) in str(report.path) and digest not in str(report.path)
    key = shape_key(tiny_pipe.resolution, 1)
    assert ArtifactStore(tmp_path).find(digest, GRAPH, "fp32", key) is not None

    # a changed spec rebuilds in place
    builder = _builder(tiny_pipe, tmp_path, digest, validate=False)
    spec = dataclasses.replace(GRAPHS[GRAPH], version=GRAPHS[GRAPH].version + 1)
    report = builder.export_graph(spec)
    assert report.stages == {"onnx": "built", "optimize": "built"}
    manifest = json.loads((report.path / "manifest.json").read_text())
    assert manifest["spec_hash"] == spec.spec_hash()

    # another torch version rebuilds too
    builder.versions = {**builder.versions, "torch": "0.0.0"}
    assert builder.export_graph(spec).stages["onnx"] == "built"
    assert builder.export_graph(spec).stages["onnx"] == "cached"


def test_truncated_or_corrupt_files_are_detected_and_rebuilt(tiny_pipe, digest, tmp_path, caplog):
    report = _builder(tiny_pipe, tmp_path, digest, validate=False).run([GRAPH], progress=False)[0]
    store, key = ArtifactStore(tmp_path), shape_key(tiny_pipe.resolution, 1)
    assert store.find(digest, GRAPH, "fp32", key) is not None

    onnx_file = report.path / ONNX_FILE
    data = onnx_file.read_bytes()
    onnx_file.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="profusion_rt.artifacts.store"):
        assert store.find(digest, GRAPH, "fp32", key) is None
    assert "truncated" in caplog.text and ONNX_FILE in caplog.text
    again = _builder(tiny_pipe, tmp_path, digest, validate=False).run([GRAPH], progress=False)[0]
    assert again.stages["onnx"] == "built"
    assert store.find(digest, GRAPH, "fp32", key) is not None

    # same size, one byte flipped: only the hash can tell
    opt_file = report.path / OPT_ONNX_FILE
    raw = bytearray(opt_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    opt_file.write_bytes(bytes(raw))
    assert store.find(digest, GRAPH, "fp32", key, verify="size") is not None
    assert store.find(digest, GRAPH, "fp32", key) is None
    again = _builder(tiny_pipe, tmp_path, digest).run([GRAPH], progress=False)[0]
    assert again.stages == {"onnx": "cached", "optimize": "built", "validate": "built"}
    assert again.passed
    assert store.find(digest, GRAPH, "fp32", key) is not None

    # a missing manifest means a missing artifact
    (report.path / "manifest.json").unlink()
    assert store.find(digest, GRAPH, "fp32", key) is None


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # fails while writing the temporary file
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_runtime_metadata_without_weights(tiny_export, tiny_pipe):
    root, builder, _ = tiny_export
    meta = load_runtime_metadata(root)  # the root holds one model
    assert meta.model_hash == builder.model_hash
    assert meta.resolution == 256 and meta.latent_shape == (4, 32, 32)
    assert meta.text_skip_layers == tiny_pipe.text_skip_layers
    assert meta.vae_scaling_factor == pytest.approx(tiny_pipe.vae.config.scaling_factor)
    assert meta.dims == builder.dims and meta.preset == "tiny"
    assert meta.scheduler["num_train_timesteps"] == 1000
    tok = meta.load_tokenizer()
    text = "a photo of a cat"
    assert tok(text).input_ids == tiny_pipe.tokenizer(text).input_ids
    # the runtime allocates its buffers from the spec and these dims
    assert GRAPHS["unet"].resolve_shapes(meta.dims, 2)["sample"] == (2, 4, 32, 32)
    entries = ArtifactStore(root).entries(meta.model_hash)
    assert {e.graph for e in entries} == set(GRAPHS)
    assert ArtifactStore(root).models() == [meta.model_hash]
