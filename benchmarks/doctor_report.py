"""The doctor's report: the environment it runs in (versions, hardware, install lines), one-line summaries of
check results, and the Markdown and JSON files it writes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from profusion_rt.benchmarks.measure import machine_info, versions

from profusion_rt.core.fsio import atomic_write_bytes, atomic_write_json
from profusion_rt.core.hardware import bf16_support

#: lines printed for a machine that lacks the project's dependencies (also in docs/doctor.md)
INSTALL_LINES = {
    "cuda": ["GPU with a CUDA torch already installed (keeps that torch): pip install -e '.[onnx,serve]'",
             "onnxruntime's CUDA provider: pip uninstall -y onnxruntime && pip install -e '.[gpu]'; "
             "TensorRT: pip install -e '.[tensorrt]'"],
    "cpu": ["CPU machine (CPU build of torch, one command so pip never pulls a CUDA torch): "
            "pip install torch==2.13.0 -e '.[dev]'"],
}


# -- environment ---------------------------------------------------------------------------------------------
def environment(device) -> dict[str, Any]:
    """Versions and hardware: torch, CUDA, cuDNN, onnxruntime (+ providers), TensorRT, polygraphy, CPU, bf16."""
    import torch

    env: dict[str, Any] = {"versions": versions(), "machine": machine_info(device)}
    env["torch"] = torch.__version__
    env["cuda"] = torch.version.cuda
    env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    env["cuda_available"] = torch.cuda.is_available()
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
        env["onnxruntime_providers"] = list(onnxruntime.get_available_providers())
    except ImportError:
        env["onnxruntime"], env["onnxruntime_providers"] = None, []
    try:
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
    except ImportError:
        env["tensorrt"] = None
    try:
        import polygraphy

        env["polygraphy"] = polygraphy.__version__
    except ImportError:
        env["polygraphy"] = None
    bf16 = bf16_support()
    env["cpu"] = {"model": bf16.cpu, "cores": os.cpu_count(), "bf16_native": bf16.native, "bf16_flags": list(bf16.flags),
                  "bf16": bf16.describe()}
    dev = torch.device(device)
    env["device_name"] = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                          else f"CPU: {bf16.cpu}, {os.cpu_count()} cores")
    env["torch_threads"] = torch.get_num_threads()
    return env


def environment_lines(env: dict[str, Any], device_type: str) -> list[str]:
    cudnn = env["cudnn"]
    lines = [
        f"device: {env['device_name']}",
        f"torch {env['torch']} (CUDA {env['cuda'] or 'none'}, cuDNN {cudnn if cudnn else 'none'}, "
        f"{env['torch_threads']} CPU threads)",
        (f"onnxruntime {env['onnxruntime']}, providers: {', '.join(env['onnxruntime_providers'])}"
         if env["onnxruntime"] else "onnxruntime: not installed"),
        f"TensorRT: {env['tensorrt'] or 'not installed'}",
        f"polygraphy: {env['polygraphy'] or 'not installed'}",
        f"CPU: {env['cpu']['model']}, {env['cpu']['cores']} cores; {env['cpu']['bf16']}",
    ]
    missing = [name for name in ("onnxruntime", "polygraphy") if not env[name]]
    if missing:
        lines.append(f"missing: {', '.join(missing)}")
    lines += [f"install: {line}" for line in INSTALL_LINES[device_type]]
    return lines


def summary(details: dict[str, Any]) -> str:
    parts = []
    for key, value in details.items():
        if isinstance(value, dict) and "latent_max_rel" in value:
            parts.append(f"{key} max rel. err {value['latent_max_rel']:.1e}")
        elif key in ("latent_max_rel",):
            parts.append(f"max rel. err {value:.1e}")
        elif key in ("recompiles_after_first_request", "graph_breaks", "providers", "losses", "psnr_db",
                     "tensors_updated", "cuda-graph"):
            if isinstance(value, list) and value and isinstance(value[0], float):
                value = ", ".join(f"{v:.3f}" for v in value)
            elif isinstance(value, float):
                value = f"{value:.1f}"
            parts.append(f"{key} {value}")
    return "; ".join(parts)


# -- reports ----------------------------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# profusion-rt doctor: {report['device_name']}", ""]
    lines += [f"- {line}" for line in environment_lines(env, "cuda" if report["device"].startswith("cuda") else "cpu")]
    lines += [f"- budget {report['budget_s']:.0f} s, elapsed {report['elapsed_s']:.0f} s, machine-speed factor "
              f"{report['slowness']:.1f} (1 = a quiet 2-core CPU / the GPU estimates)", ""]
    lines += ["## Checks", "", "| # | check | status | seconds | details |", "| ---: | --- | --- | ---: | --- |"]
    for i, c in enumerate(report["checks"], 1):
        text = c["reason"] if c["reason"] else summary(c["details"])
        lines.append(f"| {i} | {c['name']}: {c['title']} | {c['status']} | "
                     f"{c['seconds']:.1f} | {text.replace('|', '/')} |")
    lines.append("")
    if report["failed"]:
        lines += [f"**FAILED: {report['failed']['check']}**: {report['failed']['reason']}", ""]
    if report["timing"]:
        tr = report["timing_request"]
        lines += [f"## Timing on {report['device_name']}", "",
                  f"One process, median of {tr['repeats']} call(s) after one untimed call; batch 1, 1 fusion step, "
                  "the demo photo; end to end = prepare + loop + decode. Indicative: `profusion-rt bench` "
                  "measures each backend in its own process.", "",
                  "| config | backend | steps | per step (ms) | vs eager (per step) | end to end (s) | vs eager |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in report["timing"]:
            if r.get("status") != "ok":
                lines.append(f"| {r['config']} | {r['backend']} | {r['steps']} | {r['status']} | | | |")
                continue
            ratio = f"{r['vs_eager']:.2f}x" if "vs_eager" in r else ""
            step_ratio = f"{r['vs_eager_per_step']:.2f}x" if "vs_eager_per_step" in r else ""
            lines.append(f"| {r['config']} | {r['backend']} | {r['steps']} | {r['per_step_ms']:.1f} | {step_ratio} | "
                         f"{r['end_to_end_s']:.3f} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    md = atomic_write_bytes(out / "doctor.md", markdown(report).encode())
    js = atomic_write_json(out / "doctor.json", json.loads(json.dumps(report, default=str)))
    return [md, js]
