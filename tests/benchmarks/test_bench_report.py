"""The result writers: JSON (strict, every sample), Markdown tables and PNG plots from a small fake result
set; skipped rows say why and carry no numbers."""

from __future__ import annotations

import json
import math

import pytest

from profusion_rt.benchmarks.report import fmt_num, fmt_si, write_all


def _stats(median, lo=None, hi=None):
    lo = median * 0.9 if lo is None else lo
    hi = median * 1.2 if hi is None else hi
    return {"n": 3, "median_s": median, "mean_s": median, "min_s": lo, "max_s": hi, "iqr_s": hi - lo,
            "stdev_s": 0.1, "samples": [lo, median, hi]}


def _timed(median):
    return {**_stats(median), "cpu": _stats(median * 0.8)}


def _phases(total):
    return {"total_s": _stats(total), "prepare_s": _stats(0.1), "loop_s": _stats(total - 0.3),
            "decode_s": _stats(0.2), "cpu_s": _stats(total * 0.8)}


def fake_results():
    ok = {"ok": True, "first_call_s": 2.0, "min_s": 0.65, "max_s": 1.3, "peak_rss_mb": 600.0, "peak_cuda_mb": None,
          "loop_s_per_step": 0.08, "flops_per_request": 3.1e10, "flops_per_s": 3.0e10, "utilization": 0.4}
    return {
        "schema": 1, "suite": "quick", "created": "2026-11-26T05:00:00+0000", "machine_tag": "cpu-2core",
        "machine": {"cpu": "Fake CPU", "cpus": 2, "cpu_flags": ["avx2"], "memory_gib": 24.0, "gpu": None,
                    "device": "cpu"},
        "versions": {"python": "3.11.7", "torch": "2.13.0+cpu", "onnxruntime": "1.32.0"},
        "config": {"mode": "quick", "model": "tiny", "device": "cpu", "dtype": "fp32", "steps": 10,
                   "fusion_steps": 1, "batch": 1, "seed": 0, "warmup": 0, "repeats": 3, "threads": 1},
        "resolution": 256, "time_basis": "cpu", "peak_flops": 8e10,
        "load_average": {"start": [3.5, 3.6, 3.8], "end": [4.0, 3.7, 3.8]},
        "elapsed_s": 123.0,
        "peak": {"best_flops": 7.5e10, "median_flops": 7.0e10, "what": "torch.mm", "timing": _stats(0.2)},
        "network_flops": {"unet": 1.0e9, "promptnet": 5e8, "text_encoder": 1e7, "image_encoder": 2e7,
                          "vae_encoder": 3e8, "vae_decoder": 6e8},
        "e2e": [
            {"name": "eager", **ok, "median_s": 1.0, "speedup_vs_eager": 1.0, "phases": _phases(1.0)},
            {"name": "torch", **ok, "median_s": 0.8, "speedup_vs_eager": 1.25, "phases": _phases(0.8),
             "parity": {"latent_max_abs": 0.0, "latent_max_rel": 0.0, "pixel_match": 1.0, "psnr_db": math.inf}},
            {"name": "onnxruntime", **ok, "median_s": 0.7, "speedup_vs_eager": 1.43, "phases": _phases(0.7),
             "parity": {"latent_max_abs": 1e-6, "latent_max_rel": 1e-7, "pixel_match": 1.0, "psnr_db": 95.2}},
            {"name": "torch-compile", "ok": False, "reason": "--with-compile not given"},
            {"name": "cuda-graph", "ok": False, "reason": "needs CUDA"},
            {"name": "tensorrt", "ok": False, "reason": "TensorRT not installed"},
        ],
        "stages": [
            {"stage": "UNet", "graph": "unet", "batch": 2, "what": "", "flops": 2e9,
             "torch": {"status": "ok", **_timed(0.02), "flops_per_s": 1e11, "utilization": 0.5},
             "onnxruntime": {"status": "ok", **_timed(0.015), "flops_per_s": 1.3e11, "utilization": 0.6},
             "ort_speedup": 1.33, "ort_speedup_cpu": 1.3},
            {"stage": "fusion stage", "graph": "fusion_stage_official", "batch": 1, "what": "", "flops": 4e9,
             "torch": {"status": "ok", **_timed(0.05)},
             "onnxruntime": {"status": "skipped", "reason": "torch-only variant"}},
        ],
        "comparisons": [
            {"group": "eager", "mode": "plain", "label": "plain SD2 guidance", "fusion_steps": 0,
             "reference_guidance": False, "steps": 10, "unet_evals_per_step": "1 x 2", "flops_per_request": 2e10,
             **_phases(0.5), "ratio_vs_plain": 1.0, "loop_ratio_vs_plain": 1.0},
            {"group": "eager", "mode": "minimal", "label": "fusion sampling, R=1", "fusion_steps": 1,
             "reference_guidance": True, "steps": 10, "unet_evals_per_step": "1 x 2 + 1 x 3",
             "flops_per_request": 6e10, **_phases(1.2), "ratio_vs_plain": 2.4, "loop_ratio_vs_plain": 2.8},
            {"group": "fused", "mode": "minimal", "label": "fused stages, minimal (ours), R=1", "fusion_steps": 1,
             "reference_guidance": True, "steps": 10, "unet_evals_per_step": "1 x 2 + 1 x 3",
             "flops_per_request": 6e10, **_phases(1.0), "ratio_vs_minimal": 1.0, "loop_ratio_vs_minimal": 1.0},
            {"group": "fused", "mode": "official", "label": "fused stages, official-style, R=1", "fusion_steps": 1,
             "reference_guidance": True, "steps": 10, "unet_evals_per_step": "2 x 3", "flops_per_request": 7e10,
             **_phases(1.2), "ratio_vs_minimal": 1.2, "loop_ratio_vs_minimal": 1.25, "max_abs_diff_vs_minimal": 0.0},
        ],
        "scaling": [
            {"backend": "torch", "axis": axis, "value": v, "batch": v if axis == "batch" else 1,
             "steps": v if axis == "steps" else 5, "resolution": v if axis == "resolution" else 256,
             "status": "ok", **_phases(0.3 * v if axis != "resolution" else v / 256), "s_per_image": 0.3,
             "images_per_s": 3.3, "loop_s_per_step": 0.05, "flops_per_s": 2e10, "utilization": 0.3,
             "peak_rss_mb": 700.0}
            for axis, vals in (("batch", (1, 2, 4)), ("steps", (5, 10)), ("resolution", (128, 256)))
            for v in vals
        ] + [{"backend": "torch", "axis": "resolution", "value": 384, "batch": 1, "steps": 5, "resolution": 384,
              "status": "failed", "reason": "RuntimeError: boom"}],
    }


def test_write_all_produces_json_markdown_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    paths = write_all(fake_results(), tmp_path)
    names = {p.name for p in paths}
    assert {"results.json", "results.md", "snippet.md", "e2e.png", "stages.png", "comparisons.png",
            "scaling.png"} <= names
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = json.loads((tmp_path / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert data["e2e"][1]["parity"]["psnr_db"] == "inf"  # strict JSON: no Infinity literal
    assert data["stages"][0]["torch"]["samples"] == pytest.approx([0.018, 0.02, 0.024])

    md = (tmp_path / "results.md").read_text()
    assert "| `cuda-graph` | skipped: needs CUDA |" in md
    assert "| `tensorrt` | skipped: TensorRT not installed |" in md
    assert "| `torch-compile` | skipped: --with-compile not given |" in md
    assert "1.25x" in md and "inf (identical)" in md and "CPU time (s)" in md
    assert "Fake CPU" in md and "load average 3.5/3.6/3.8" in md
    assert "![e2e](e2e.png)" in md
    assert "failed: RuntimeError: boom" in md
    assert "official-style" in md and "2 x 3" in md
    # no numbers in a skipped row
    row = next(line for line in md.splitlines() if line.startswith("| `cuda-graph`"))
    assert not any(ch.isdigit() for ch in row.replace("needs CUDA", ""))

    snippet = (tmp_path / "snippet.md").read_text()
    assert "![end-to-end time per backend](" in snippet and "e2e.png)" in snippet
    assert "| `eager` | reference |" in snippet and "Fake CPU" in snippet


def test_write_all_without_plots(tmp_path):
    (tmp_path / "e2e.png").write_bytes(b"stale")
    paths = write_all(fake_results(), tmp_path, plots=False)
    assert {p.name for p in paths} == {"results.json", "results.md", "snippet.md"}
    assert not (tmp_path / "e2e.png").exists()  # a stale plot is not left beside new numbers
    assert "Plots: not written" in (tmp_path / "results.md").read_text()


def test_formatting():
    assert fmt_num(0.012345) == "0.0123" and fmt_num(123.4) == "123" and fmt_num(None) == ""
    assert fmt_num(math.inf) == "inf"
    assert fmt_si(3.07e10, "FLOP") == "30.7 GFLOP" and fmt_si(8.04e14) == "804 T"
