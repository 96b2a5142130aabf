"""A ``bench --quick``-like run at toy size (2 steps, 1 repeat, eager + torch only, every task on): the
worker processes run and the three outputs are written. Speed is never asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_quick_like_run_writes_the_three_outputs(tmp_path):
    pytest.importorskip("matplotlib")
    from profusion_rt.benchmarks.suite import SuiteConfig, run_suite

    cfg = SuiteConfig.quick(
        backends=("eager", "torch"), steps=2, repeats=1, threads=1,
        stages={"warmup": 1, "repeats": 1, "graphs": ["promptnet", "fusion_stage", "fusion_stage_official"]},
        compare={"steps": 2, "warmup": 0, "repeats": 1, "fusion_steps": [0, 1], "official_fusion_steps": [1]},
        scaling={"backends": ["torch"], "batch": [1, 2], "steps": [], "resolution": [128], "base_steps": 2,
                 "warmup": 0, "repeats": 1},
        out=tmp_path / "results", runs_dir=tmp_path / "runs", artifacts=tmp_path / "artifacts",
    )
    lines = []
    results = run_suite(cfg, log=lines.append)
    out = tmp_path / "results"
    for name in ("results.json", "results.md", "snippet.md", "e2e.png", "stages.png", "comparisons.png",
                 "scaling.png"):
        assert (out / name).is_file(), name

    data = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in data["e2e"]}
    assert set(rows) == {"eager", "torch"}, "unselected rows are left out"
    assert rows["eager"]["ok"] and rows["torch"]["ok"], lines
    assert len(rows["torch"]["runs"]) == 1 and rows["torch"]["speedup_vs_eager"] > 0
    assert rows["torch"]["parity"]["latent_max_rel"] < 1e-4  # the fused loop computes the reference's x
    assert data["peak"]["best_flops"] > 0 and 0 < rows["eager"]["utilization"]
    assert data["machine"]["cpus"] and data["versions"]["torch"] and data["config"]["steps"] == 2
    assert not (tmp_path / "artifacts").exists(), "no export without an onnxruntime row"

    stages = {s["graph"]: s for s in data["stages"]}
    assert set(stages) == {"promptnet", "fusion_stage", "fusion_stage_official"}
    assert all(s["torch"]["status"] == "ok" and s["flops"] > 0 for s in stages.values())

    comps = data["comparisons"]
    assert [c["label"] for c in comps][:1] == ["plain SD2 guidance (no reference)"]
    official = next(c for c in comps if c["mode"] == "official")
    assert official["max_abs_diff_vs_minimal"] < 1e-4 and official["unet_evals_per_step"] == "2 x 3"
    assert official["flops_per_request"] > next(c for c in comps if c["group"] == "fused"
                                                and c["mode"] == "minimal")["flops_per_request"]

    points = {(p["axis"], p["value"]): p for p in data["scaling"]}
    assert set(points) == {("batch", 1), ("batch", 2), ("resolution", 128)}
    assert all(p["status"] == "ok" for p in points.values()), points
    assert points[("batch", 2)]["flops_per_request"] == 2 * points[("batch", 1)]["flops_per_request"]

    md = (out / "results.md").read_text()
    assert "| `eager` | reference |" in md and "official-style" in md
    assert results["files"] and Path(results["files"][0]).name == "results.json"


def test_cli_config_quick_and_full(monkeypatch):
    import argparse

    from profusion_rt.benchmarks.cli import add_arguments, config_from_args
    from profusion_rt.core.errors import InvalidParameterError

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args([]))
    assert cfg.mode == "quick" and cfg.model == "tiny" and cfg.threads == 1 and not cfg.with_compile
    cfg = config_from_args(parser.parse_args(["--backends", "torch,onnxruntime", "--steps", "4", "--no-scaling"]))
    assert cfg.backends == ("eager", "torch", "onnxruntime") and cfg.steps == 4 and cfg.scaling is None
    cfg = config_from_args(parser.parse_args(["--full", "--device", "cpu", "--dtype", "fp32"]))
    assert cfg.mode == "full" and cfg.model == "sd2-base" and cfg.steps == 50 and cfg.with_compile
    with pytest.raises(InvalidParameterError):
        config_from_args(parser.parse_args(["--backends", "nope"]))


def test_profusion_rt_cli_registers_bench():
    from profusion_rt.cli import build_parser

    args = build_parser().parse_args(["bench", "--quick", "--no-plots"])
    assert args.handler.__name__ == "cmd_bench" and args.mode == "quick" and args.no_plots


def test_reasons_on_this_machine():
    """Rows that cannot run here say why (never numbers): CUDA graphs need CUDA, compile needs the flag."""
    import torch

    from profusion_rt.benchmarks.suite import SuiteConfig, row_reasons

    reasons = row_reasons(SuiteConfig.quick())
    assert reasons["eager"] == "" and reasons["torch"] == ""
    assert reasons["torch-compile"] == "--with-compile not given"
    if not torch.cuda.is_available():
        assert reasons["cuda-graph"] == "needs CUDA"
        assert reasons["torch-compile+cuda-graph"] == "needs CUDA"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert reasons["tensorrt"] == "TensorRT not installed"


def test_worker_keeps_the_demo_job_format(tmp_path, monkeypatch):
    """The demo's job (no ``tasks``) still measures end to end and writes <name>.npz and <name>.json."""
    import numpy as np

    from profusion_rt.benchmarks.worker import run_job

    job = {"backend": "torch", "name": "torch", "model": "tiny", "artifacts": None,
           "request": {"prompt": "a {S*} wearing sunglasses", "num_inference_steps": 2, "seed": 0, "fusion_steps": 1},
           "warmup": 0, "repeats": 1, "out": str(tmp_path), "threads": 1}
    result = run_job(job)
    for key in ("median_s", "min_s", "max_s", "first_call_s", "runs", "peak_rss_mb", "setup_s"):
        assert key in result
    assert {"prepare_s", "loop_s", "decode_s", "total_s"} <= set(result["runs"][0])
    data = np.load(tmp_path / "torch.npz")
    assert data["latents"].shape == (1, 4, 32, 32) and data["images"].shape == (1, 256, 256, 3)
    assert json.loads((tmp_path / "torch.json").read_text())["name"] == "torch"


def test_demo_interleaves_timed_runs_across_live_workers(tmp_path):
    """The demo keeps one worker per backend alive and gives each the same number of timed runs; a worker
    that fails is reported with its reason and the others still finish."""
    import numpy as np

    from profusion_rt.benchmarks.runner import run_interleaved

    base = {"model": "tiny", "artifacts": None, "warmup": 0, "repeats": 2, "out": str(tmp_path), "threads": 1,
            "request": {"prompt": "a {S*}", "num_inference_steps": 2, "seed": 0, "fusion_steps": 1}}
    jobs = {"eager": dict(base, backend="eager", name="eager"), "torch": dict(base, backend="torch", name="torch"),
            "onnxruntime": dict(base, backend="onnxruntime", name="onnxruntime")}  # no artifacts: must fail
    lines = []
    results = run_interleaved(jobs, repeats=2, log=lines.append)
    assert results["eager"]["ok"] and results["torch"]["ok"]
    assert len(results["eager"]["runs"]) == 2 and len(results["torch"]["runs"]) == 2
    np.testing.assert_allclose(results["torch"]["_latents"], results["eager"]["_latents"], rtol=0, atol=1e-4)
    assert not results["onnxruntime"]["ok"] and "artifact" in results["onnxruntime"]["reason"]
    assert any("onnxruntime: FAILED" in ln for ln in lines)
