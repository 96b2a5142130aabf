"""`profusion-rt doctor`: the CPU ladder passes end to end and writes its reports; a broken backend stops the
ladder with exit 1 naming the check; the budget, bad input and the bf16 detection behave."""

from __future__ import annotations

import json
import time

import pytest

from profusion_rt.benchmarks import doctor
from profusion_rt.cli import main
from profusion_rt.core.hardware import bf16_support, native_bf16


def _report(out) -> dict:
    return json.loads((out / "doctor.json").read_text())


def test_doctor_cpu_ladder_passes(tmp_path, capsys):
    # The CI run of the doctor, minus torch.compile's 1-2 min first compilation (the default `doctor --device
    # cpu` includes it): tiny fp32 parity, an ONNX export + onnxruntime, a 5-step customization, the timing
    # table. About 40-60 s on a quiet 2-core CPU (most of it the export); the budget bounds it.
    out = tmp_path / "doctor"
    code = main(["doctor", "--device", "cpu", "--skip", "torch-compile", "--budget-s", "240", "--timing-steps", "2",
                 "--timing-repeats", "1", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    report = _report(out)
    md = (out / "doctor.md").read_text()
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == list(doctor.CHECKS)
    executed = [c for c in checks.values() if c["status"] in ("passed", "failed")]
    assert executed and all(c["status"] == "passed" for c in executed), stdout
    assert all(c["status"] in ("passed", "skipped") and (c["status"] == "passed" or c["reason"])
               for c in checks.values())
    assert checks["tiny-fp32"]["status"] == "passed"
    assert checks["tiny-fp32"]["details"]["cuda-graph"] == "skipped: needs CUDA"
    assert checks["tiny-fp32"]["details"]["torch"]["latent_max_rel"] <= 1e-4
    assert checks["torch-compile"]["reason"] == "--skip"
    assert "needs a CUDA GPU" in checks["sd2-base-fp16"]["reason"]
    assert checks["tensorrt"]["status"] == "skipped"
    if checks["onnxruntime"]["status"] == "passed":  # skipped only when the budget ran short
        assert checks["onnxruntime"]["details"]["providers"] == ["CPUExecutionProvider"]
    if checks["customize"]["status"] == "passed":
        assert len(checks["customize"]["details"]["losses"]) == 5
    assert report["failed"] is None and report["environment"]["torch"]
    assert "bf16" in report["environment"]["cpu"]["bf16"]
    rows = {r["backend"]: r for r in report["timing"]}
    assert "eager" in rows and "torch" in rows
    for row in rows.values():
        assert row["status"] == "ok" or row["status"].startswith("skipped (budget")
        if row["status"] == "ok":
            assert row["per_step_ms"] > 0 and row["end_to_end_s"] > 0
    assert "## Checks" in md and "| tiny-fp32:" in md.replace("| 1 | ", "| ")
    assert report["device_name"] in md and "install:" in md
    assert "pip install -e '.[onnx,serve]'" not in stdout  # CPU machine: the CPU install line
    assert "pip install torch==2.13.0 -e '.[dev]'" in stdout
    assert "check(s) passed" in stdout


@pytest.fixture
def shared_pipe(tiny_pipe, monkeypatch):
    """The doctor on the session's tiny pipeline (the same seed-0 weights it would build)."""
    monkeypatch.setattr(doctor.Doctor, "cpu_pipe", property(lambda self: tiny_pipe))
    return tiny_pipe


def _broken_engine_run(monkeypatch):
    from profusion_rt.runtime.torch_engine import TorchEngine

    run = TorchEngine.run

    def broken(self, feeds, outputs):  # a backend that computes something slightly different
        run(self, feeds, outputs)
        outputs[self.output_name].mul_(1.01)
    monkeypatch.setattr(TorchEngine, "run", broken)


def _stale_inputs(monkeypatch):
    from profusion_rt.runtime.runtime import Runtime

    load = Runtime._load

    def load_once(self, buf, req):  # a replay that ignores the new request's inputs
        if not getattr(buf, "_loaded", False):
            load(self, buf, req)
            buf._loaded = True
    monkeypatch.setattr(Runtime, "_load", load_once)


@pytest.mark.parametrize("breakage,where", [(_broken_engine_run, "seed 0, 2 steps"), (_stale_inputs, "seed 1, 2 steps")])
def test_broken_backend_stops_the_ladder(shared_pipe, breakage, where, tmp_path, capsys, monkeypatch):
    breakage(monkeypatch)
    out = tmp_path / "doctor"
    code = main(["doctor", "--device", "cpu", "--budget-s", "1000", "--out", str(out)])  # stops at check 1
    stdout = capsys.readouterr().out
    assert code == 1, stdout
    failed_line = [ln for ln in stdout.splitlines() if ln.startswith("FAILED: ")]
    assert len(failed_line) == 1 and failed_line[0].startswith("FAILED: tiny-fp32: torch (fused stages) differs "
                                                                f"from eager at {where}"), stdout
    report = _report(out)
    assert report["failed"]["check"] == "tiny-fp32"
    statuses = [c["status"] for c in report["checks"]]
    assert statuses[0] == "failed" and set(statuses[1:]) == {"not run"}
    assert report["timing"] == []
    assert "FAILED: tiny-fp32" in (out / "doctor.md").read_text()


def test_budget_too_short_skips_every_check(tmp_path, capsys):
    out = tmp_path / "doctor"
    code = main(["doctor", "--device", "cpu", "--budget-s", "0.01", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    checks = _report(out)["checks"]
    assert all(c["status"] == "skipped" for c in checks)
    by_name = {c["name"]: c["reason"] for c in checks}
    for name in ("tiny-fp32", "torch-compile", "onnxruntime", "customize"):
        assert by_name[name].startswith("budget: needs about"), by_name
    assert "needs a CUDA GPU" in by_name["sd2-base-fp16"]


def test_time_limit_stops_a_long_call():
    start = time.perf_counter()
    with pytest.raises(doctor.BudgetExceeded):
        with doctor.time_limit(0.2):
            while True:
                time.sleep(0.01)
    assert time.perf_counter() - start < 5
    with doctor.time_limit(5):  # finishing in time leaves no alarm behind
        pass
    time.sleep(0.05)


@pytest.mark.parametrize("argv,message", [
    (["--skip", "nosuch"], "unknown check(s) in --skip: nosuch"),
    (["--budget-s", "-1"], "--budget-s must be a positive number"),
    (["--device", "tpu"], "--device"),
    (["--timing-repeats", "0"], "--timing-repeats must be a positive integer"),
])
def test_bad_input_exits_2(argv, message, tmp_path, capsys):
    code = main(["doctor", "--device", "cpu", *argv, "--out", str(tmp_path / "d")]
                if "--device" not in argv else ["doctor", *argv, "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "d").exists()


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    assert main(["doctor", "--device", "cuda", "--out", str(tmp_path / "d")]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("flags,native", [
    ("fpu sse2 avx2 avx512f", False),
    ("fpu avx2 avx512f avx512_bf16", True),
    ("fpu avx2 amx_bf16 amx_tile", True),
])
def test_bf16_detection(tmp_path, flags, native):
    info = tmp_path / f"cpuinfo-{native}-{len(flags)}"
    info.write_text(f"processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert native_bf16(str(info)) is native
    support = bf16_support(str(info))
    assert support.cpu == "Test CPU 9000" and support.native is native
    assert ("not native" in support.describe()) is not native


def test_bf16_detection_without_cpuinfo(tmp_path):
    assert native_bf16(str(tmp_path / "missing")) is False
    assert bf16_support(str(tmp_path / "missing")).flags == ()
