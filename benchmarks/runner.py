"""Spawn one worker process per backend and collect its results (used by the demo and the bench suite).

``run_in_subprocess(job)`` runs a job straight through in a fresh interpreter. :class:`WorkerSession`
keeps a worker alive and drives it command by command (``benchmarks.worker --serve``). :class:`WorkerPool`
is the one interleaved driver over such sessions (the suite and :func:`run_interleaved`, the demo's
schedule): the timed runs of several backends interleave, each in its own process, only one active at a time.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from profusion_rt.benchmarks.worker import PROTOCOL_PREFIX

logger = logging.getLogger(__name__)


@dataclass
class BackendResult:
    name: str
    ok: bool
    reason: str = ""
    result: dict[str, Any] | None = None
    latents: np.ndarray | None = None
    images: np.ndarray | None = None


def _worker_env() -> dict[str, str]:
    """The worker's environment: this process's (workers start with ``-m profusion_rt.benchmarks.worker``
    from the installed package, so no search-path edits are needed)."""
    return dict(os.environ)


def failure_reason(stderr: str, returncode: int | None) -> str:
    """One line saying why a worker failed: its last ``error:`` line, else its last stderr line, else the
    signal that killed it (e.g. the OOM killer) or its exit status."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    reason = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "")
    if not reason:
        code = returncode
        if code is not None and code < 0:
            import signal

            try:
                reason = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                reason = f"killed by signal {-code}"
        else:
            reason = f"exited with status {code}"
    return reason.removeprefix("error: ")


def _load_result(job: dict[str, Any], name: str) -> BackendResult:
    out = Path(job["out"])
    data = np.load(out / f"{name}.npz")
    result = json.loads((out / f"{name}.json").read_text())
    return BackendResult(name, True, "", result, data["latents"], data["images"])


def run_in_subprocess(job: dict[str, Any], timeout: float = 1800.0) -> BackendResult:
    """Run ``benchmarks.worker`` on ``job`` in a fresh interpreter."""
    name = job.get("name", job["backend"])
    cmd = [sys.executable, "-m", "profusion_rt.benchmarks.worker", "--job", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_worker_env())
    except subprocess.TimeoutExpired:
        return BackendResult(name, False, f"timed out after {timeout:.0f} s")
    if proc.returncode != 0:
        logger.debug("worker %s failed:\n%s", name, proc.stderr)
        return BackendResult(name, False, failure_reason(proc.stderr, proc.returncode))
    return _load_result(job, name)


class WorkerError(RuntimeError):
    """A served worker failed, died or timed out; the message is one line."""


class WorkerSession:
    """A ``benchmarks.worker --serve`` process for one job. :meth:`request` sends one command and waits for
    its reply (``timeout`` seconds, then the worker is killed); :meth:`finish` collects the result like
    :func:`run_in_subprocess`. Always :meth:`close` (or use as a context manager)."""

    def __init__(self, job: dict[str, Any], timeout: float = 600.0):
        self.job = job
        self.name = job.get("name", job["backend"])
        self._prefix = PROTOCOL_PREFIX
        self._stderr = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, "-m", "profusion_rt.benchmarks.worker", "--serve", "--job", json.dumps(job)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                     text=True, env=_worker_env(), bufsize=1)
        self._replies: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.ready = self._wait(timeout, "start")
        if not self.ready.get("ok"):
            self.close()
            raise WorkerError(self.ready.get("error") or "the worker did not start")

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(self._prefix):
                try:
                    self._replies.put(json.loads(line[len(self._prefix):]))
                except json.JSONDecodeError:
                    logger.warning("unreadable reply from %s: %s", self.name, line[:200])
        self._replies.put(None)  # end of stream: the process exited

    def _stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()

    def _wait(self, timeout: float, what: str) -> dict[str, Any]:
        try:
            reply = self._replies.get(timeout=max(timeout, 1.0))
        except queue.Empty:
            self.kill()
            raise WorkerError(f"timed out after {timeout:.0f} s ({what})") from None
        if reply is None:
            code = self.proc.wait(timeout=30)
            logger.debug("worker %s exited:\n%s", self.name, self._stderr_text())
            raise WorkerError(failure_reason(self._stderr_text(), code))
        return reply

    def request(self, cmd: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
        if self.proc.poll() is not None:
            raise WorkerError(failure_reason(self._stderr_text(), self.proc.returncode))
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            code = self.proc.wait(timeout=30)
            raise WorkerError(failure_reason(self._stderr_text(), code)) from None
        reply = self._wait(timeout, cmd.get("task") or cmd.get("kind") or cmd["cmd"])
        if not reply.get("ok"):
            raise WorkerError(reply.get("error") or "failed")
        return reply

    def finish(self, timeout: float = 600.0) -> BackendResult:
        self.request({"cmd": "finish"}, timeout)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
        return _load_result(self.job, self.name)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self._stderr.close()

    def __enter__(self) -> "WorkerSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()




def rotated(names: list[str], i: int) -> list[str]:
    """``names`` started at position ``i`` (mod its length): round ``i`` of an interleaved schedule."""
    k = i % max(len(names), 1)
    return names[k:] + names[:k]


class WorkerPool:
    """The one interleaved-worker driver (the demo and the bench suite): one live :class:`WorkerSession`
    per job, only one of them active at a time. A worker that fails is killed and reported once through
    ``on_fail(name, error)``; the others go on. ``timeout``: seconds per command, a number or a function
    called before each command (e.g. what is left of a time budget). Use as a context manager, or
    :meth:`close`, so that no worker outlives the driver."""

    def __init__(self, on_fail: Callable[[str, WorkerError], None], timeout: float | Callable[[], float] = 600.0):
        self.live: dict[str, WorkerSession] = {}
        self._on_fail = on_fail
        self._timeout = timeout

    def timeout(self) -> float:
        return self._timeout() if callable(self._timeout) else self._timeout

    def fail(self, name: str, exc: WorkerError) -> None:
        """Report worker ``name``'s failure through ``on_fail`` and drop it."""
        session = self.live.pop(name, None)
        self._on_fail(name, exc)
        if session is not None:
            session.kill()
            session.close()

    def discard(self, name: str) -> None:
        """Kill worker ``name`` (if live) without reporting it (the caller says why)."""
        session = self.live.pop(name, None)
        if session is not None:
            session.kill()
            session.close()

    def start(self, name: str, job: dict[str, Any], timeout: float | None = None) -> WorkerSession | None:
        """Start ``job``'s worker (it loads its model); ``None`` if it failed to start."""
        try:
            self.live[name] = WorkerSession(job, timeout=self.timeout() if timeout is None else timeout)
        except WorkerError as exc:
            self.fail(name, exc)
            return None
        return self.live[name]

    def request(self, name: str, cmd: dict[str, Any], timeout: float | None = None) -> bool:
        """Send ``cmd`` to worker ``name``; False (and the worker dropped) if it failed."""
        try:
            self.live[name].request(cmd, timeout=self.timeout() if timeout is None else timeout)
            return True
        except WorkerError as exc:
            self.fail(name, exc)
            return False

    def rounds(self, count: int, cmd: dict[str, Any], repeats: Mapping[str, int] | None = None,
               before_round: Callable[[int], bool] | None = None, timeout: float | None = None) -> int:
        """``count`` rounds of one ``cmd`` per live worker, the order rotating by one each round, so that a
        drift in machine load hits every worker alike. A worker takes part in round ``i`` only while
        ``i < repeats[name]`` (when given); ``before_round(i)`` returning False stops early. Returns the
        rounds run."""
        for i in range(count):
            if before_round is not None and not before_round(i):
                return i
            for name in rotated(list(self.live), i):
                if name in self.live and (repeats is None or i < repeats[name]):
                    self.request(name, cmd, timeout)
        return count

    def finish(self, name: str, timeout: float | None = None) -> BackendResult | None:
        """Collect worker ``name``'s result (it exits); ``None`` if that failed."""
        try:
            return self.live.pop(name).finish(**({} if timeout is None else {"timeout": timeout}))
        except WorkerError as exc:
            self.fail(name, exc)
            return None

    def close(self) -> None:
        """Kill every worker still alive."""
        for session in self.live.values():
            session.kill()
            session.close()
        self.live.clear()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_interleaved(jobs: dict[str, dict], repeats: int, log=print) -> dict[str, dict]:
    """Every job in its own live worker process (``--serve``), only one active at a time: each one's first
    (warm-up) call, then ``repeats`` rounds of one timed call per job in a rotating order (the demo's
    schedule). Returns name -> row (``ok``, the worker's result, ``_latents``/``_images``; or ``reason``)."""
    results: dict[str, dict] = {}

    def failed(name: str, exc: WorkerError) -> None:
        results[name] = {"name": name, "ok": False, "reason": str(exc)}
        log(f"      {name}: FAILED ({exc})")

    with WorkerPool(failed, timeout=1800) as pool:
        for name, job in jobs.items():
            if pool.start(name, job, timeout=600.0) is not None:
                pool.request(name, {"cmd": "call", "kind": "first"})
        pool.rounds(max(repeats, 1), {"cmd": "call", "kind": "timed"})
        for name in list(pool.live):
            res = pool.finish(name, timeout=600.0)
            if res is None:
                continue
            results[name] = {"name": name, "ok": True, **res.result, "_latents": res.latents, "_images": res.images}
            log(f"      {name}: median {res.result['median_s']:.2f} s (first call {res.result['first_call_s']:.2f} s)")
    return results
