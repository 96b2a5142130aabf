"""Optional bearer-token authentication (``--api-keys-file``).

With keys, every ``/v1/*`` request (and ``/metrics`` with ``--metrics-need-key``) needs the header
``Authorization: Bearer <key>`` naming one of them; otherwise the answer is 401 with
``WWW-Authenticate: Bearer`` and the usual JSON error body, before any of the body is read. ``/healthz``,
``/docs`` and ``/openapi.json`` stay open. A key is compared with every configured key in constant time
(``hmac.compare_digest`` over SHA-256 digests, all keys each time). Keys are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from pathlib import Path
from typing import Callable

from profusion_rt.core.errors import InvalidParameterError
from profusion_rt.serve.errors import UnauthorizedError, error_body

logger = logging.getLogger(__name__)

__all__ = ["ApiKeys", "AuthMiddleware", "load_api_keys"]


class ApiKeys:
    """A set of API keys, kept as SHA-256 digests (the keys themselves are not kept)."""

    def __init__(self, keys: list[str]):
        if not keys:
            raise InvalidParameterError("no API key given")
        self._digests = [hashlib.sha256(k.encode("utf-8")).digest() for k in keys]

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self)} keys)"

    def check(self, presented: str | None) -> bool:
        """True when ``presented`` is one of the keys; compares against every key in constant time."""
        if presented is None:
            return False
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found = False
        for known in self._digests:
            found |= hmac.compare_digest(digest, known)
        return found


def load_api_keys(path: str | os.PathLike) -> ApiKeys:
    """The keys of ``path``: one per line; blank lines and lines starting with ``#`` are ignored, the
    rest is stripped. :class:`InvalidParameterError` (never quoting a key) if the file is unreadable,
    holds no key, or a key holds whitespace."""
    source = Path(path).expanduser()
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidParameterError(f"cannot read the API keys file {source}: "
                                    f"{getattr(exc, 'strerror', None) or type(exc).__name__}") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if any(c.isspace() for c in key):
            raise InvalidParameterError(f"line {number} of the API keys file {source} holds whitespace inside a key")
        keys.append(key)
    if not keys:
        raise InvalidParameterError(f"the API keys file {source} holds no key")
    logger.info("%d API key(s) from %s", len(keys), source)
    return ApiKeys(keys)


def bearer_token(header: bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, else None."""
    if not header:
        return None
    scheme, _, token = header.decode("latin-1").strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class AuthMiddleware:
    """ASGI middleware: 401 for protected paths without a right key, before the app reads the body."""

    def __init__(self, app, keys: ApiKeys, protect_metrics: bool = False,
                 on_refused: Callable[[], None] | None = None):
        self.app, self.keys, self.on_refused = app, keys, on_refused
        self.prefixes = ("/v1/", "/metrics") if protect_metrics else ("/v1/",)

    def protected(self, path: str) -> bool:
        return any(path.startswith(p) or path == p.rstrip("/") for p in self.prefixes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.protected(scope.get("path", "")):
            return await self.app(scope, receive, send)
        header = next((v for k, v in scope.get("headers", []) if k == b"authorization"), None)
        token = bearer_token(header)
        if self.keys.check(token):
            return await self.app(scope, receive, send)
        if self.on_refused is not None:
            self.on_refused()
        logger.info("refused %s %s: %s API key", scope.get("method"), scope.get("path"),
                    "no" if token is None else "a wrong")
        exc = UnauthorizedError("this server needs an API key: send 'Authorization: Bearer <key>'" if token is None
                                else "the API key is not valid")
        body = json.dumps(error_body(exc)).encode()
        challenge = 'Bearer realm="profusion-rt"' if token is None else \
            'Bearer realm="profusion-rt", error="invalid_token"'
        await send({"type": "http.response.start", "status": exc.status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", challenge.encode())]})
        await send({"type": "http.response.body", "body": body})
