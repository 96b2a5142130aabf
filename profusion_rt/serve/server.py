"""uvicorn serving an app on a background thread (tests, load checks, embedding next to other code)."""

from __future__ import annotations

import threading
import time

import uvicorn

from profusion_rt.core.errors import BackendUnavailableError

__all__ = ["BackgroundServer"]


class BackgroundServer:
    """uvicorn serving ``app`` on a background thread. ``port=0`` picks a free port; ``url`` says which."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 120.0):
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                lifespan="on", timeout_graceful_shutdown=10)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="profusion-serve-uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + startup_timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise BackendUnavailableError(f"the server did not start on {host}:{port}")
            if time.monotonic() > deadline:
                self.stop()
                raise BackendUnavailableError(f"the server did not start within {startup_timeout:.0f} s")
            time.sleep(0.02)
        sock = self._server.servers[0].sockets[0]
        self.host, self.port = sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 60.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

