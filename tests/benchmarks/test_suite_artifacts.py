"""The suite's artifact rows: one rule for precision vs model hash (finding 2) and the export in its own
process under the time budget (finding 15)."""

from __future__ import annotations

import time

from profusion_rt.benchmarks.suite import SuiteConfig, artifact_precision, export_for, make_job


def test_artifact_rows_load_the_float32_pipeline_whatever_the_precision(tmp_path):
    cfg = SuiteConfig.full(device="cuda", dtype="fp16")
    trt = make_job(cfg, "tensorrt", tmp_path)
    ort = make_job(cfg, "onnxruntime", tmp_path)
    eager = make_job(cfg, "eager", tmp_path)
    assert trt["dtype"] == ort["dtype"] == "fp32"  # the hash the artifacts are matched by
    assert trt["precision"] == artifact_precision(cfg, "tensorrt") == "fp16"
    assert ort["precision"] == "fp32"
    assert eager["dtype"] == "fp16" and "precision" not in eager
    assert make_job(SuiteConfig.full(device="cuda", dtype="fp32"), "tensorrt", tmp_path)["precision"] == "fp32"


def test_export_runs_in_its_own_process_under_the_budget(tmp_path):
    cfg = SuiteConfig.quick(artifacts=tmp_path / "artifacts", model="sd2-base")
    reasons = {"onnxruntime": "", "tensorrt": "TensorRT not installed"}
    start = time.monotonic()
    info = export_for(cfg, reasons, timeout_s=0.5)  # far too short for an sd2-base export
    assert time.monotonic() - start < 30
    assert "time budget" in reasons["onnxruntime"] and info["status"].startswith("failed")
    assert reasons["tensorrt"] == "TensorRT not installed"
    assert export_for(cfg, {"onnxruntime": "x", "tensorrt": "y"})["status"] == "not needed"
