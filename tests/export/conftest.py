"""Fixtures of the export tests: the tiny graphs are exported ONCE per session (legacy TorchScript
exporter for speed, the image encoder through dynamo, symbolic batch 1..4, validated at batch 1 and 2)
into a temporary artifact root that the tests read. (tests/conftest.py keeps torch at one thread: on the
shared 2-core machine two threads make the exports and the torch references up to 10x slower.)"""

from __future__ import annotations

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("polygraphy")

#: the options of the shared export (the CLI test replays them and must hit the cache)
SHARED_OPTIONS = dict(exporter="legacy", batch=1, dynamic_batch=(1, 4), validate=True, validation_seed=1234)


@pytest.fixture(scope="session")
def tiny_export(tiny_pipe, tmp_path_factory):
    """(root, builder, {graph: GraphReport}) of every graph exported from the tiny pipeline."""
    from profusion_rt.export.cache import ArtifactBuilder, ExportOptions

    root = tmp_path_factory.mktemp("artifacts")
    builder = ArtifactBuilder(tiny_pipe, root, ExportOptions(**SHARED_OPTIONS))
    reports = builder.run(progress=False, strict=False)
    return root, builder, {r.graph: r for r in reports}
