"""Spawn one worker process per backend and collect its results (used by the demo and the bench suite)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@dataclass
class BackendResult:
    name: str
    ok: bool
    reason: str = ""
    result: dict[str, Any] | None = None
    latents: np.ndarray | None = None
    images: np.ndarray | None = None


def run_in_subprocess(job: dict[str, Any], timeout: float = 1800.0) -> BackendResult:
    """Run ``benchmarks.worker`` on ``job`` in a fresh interpreter."""
    name = job.get("name", job["backend"])
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "benchmarks.worker", "--job", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return BackendResult(name, False, f"timed out after {timeout:.0f} s")
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "failed")
        logger.debug("worker %s failed:\n%s", name, proc.stderr)
        return BackendResult(name, False, reason.removeprefix("error: "))
    out = Path(job["out"])
    data = np.load(out / f"{name}.npz")
    result = json.loads((out / f"{name}.json").read_text())
    return BackendResult(name, True, "", result, data["latents"], data["images"])
