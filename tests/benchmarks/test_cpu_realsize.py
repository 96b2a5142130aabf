"""``profusion-rt bench-cpu`` (benchmarks/cpu_realsize.py) on the tiny preset: every row in its own process,
results written as JSON and Markdown with the machine and its bf16 support named. Nothing is timed."""

from __future__ import annotations

import json

import pytest
import torch

from profusion_rt.benchmarks import cpu_realsize
from profusion_rt.cli import main
from profusion_rt.core.errors import InvalidParameterError


def test_random_pipeline_is_built_in_place_in_its_dtype():
    pipe = cpu_realsize.random_pipeline("tiny", "bf16")
    params = [p for net in pipe.networks().values() for p in net.parameters()]
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in params)
    assert all(torch.isfinite(p).all() for p in params)
    ids = dict(pipe.text_encoder.named_buffers())["embeddings.position_ids"]
    assert torch.equal(ids[0], torch.arange(ids.shape[-1]))  # buffers are not left uninitialised
    stds = [float(p.float().std()) for p in params if p.dim() >= 2 and p.numel() > 1000]
    assert 0 < min(stds) and max(stds) < 1.0


def test_bench_cpu_tiny(tmp_path, capsys):
    out = tmp_path / "res"
    code = main(["bench-cpu", "--model", "tiny", "--steps", "2", "--rows", "fp32-eager,bf16-torch,fp32-onnxruntime",
                 "--threads", "1", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["bf16"]["native"] in (True, False) and results["machine"]["cpu"]
    assert results["load_average_before"] is not None
    rows = {r["row"]: r for r in results["rows"]}
    for key in ("fp32-eager", "bf16-torch"):
        row = rows[key]
        assert row["status"] == "ok", row
        assert len(row["step_s"]) == 2 and row["per_step_s"] > 0 and row["peak_rss_mb"] > 0
        assert row["finite"] is True
    assert rows["fp32-onnxruntime"]["status"].startswith("skipped: ") and "--with-onnxruntime" in \
        rows["fp32-onnxruntime"]["status"]
    md = (out / "results.md").read_text()
    assert results["machine"]["cpu"] in md and "bf16 torch (fused stages)" in md
    assert not list(out.glob(".*.json"))  # the per-row result files are removed
    assert "fp32 eager" in capsys.readouterr().out


def test_bench_cpu_bad_input(tmp_path):
    with pytest.raises(InvalidParameterError, match="at least 1"):
        cpu_realsize.run_benchmark("tiny", steps=0, out=tmp_path)
    with pytest.raises(InvalidParameterError, match="unknown row"):
        cpu_realsize.run_benchmark("tiny", rows=["fp64-eager"], out=tmp_path)
