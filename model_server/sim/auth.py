"""SGLang 0.5.23's API-key rule (``sglang/srt/utils/auth.py``), as a plain ASGI middleware.

- ``OPTIONS`` (CORS preflight), ``/health*``, ``/ready*`` and ``/metrics*`` are always open;
- normal routes need ``Authorization: Bearer <api_key>`` when an API key is set;
- admin routes (SGLang's ``/flush_cache``; the sim's own ``/sim/*``) need the
  admin key when one is set, else the API key when one is set, else nothing;
- the scheme is matched case-insensitively ("bearer" works), the key in constant time;
- a refusal is 401 ``{"error": "Unauthorized"}``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

__all__ = ["ADMIN_PREFIXES", "ApiKeyMiddleware", "allowed"]

OPEN_PREFIXES = ("/health", "/ready", "/metrics")
ADMIN_PREFIXES = ("/flush_cache", "/sim/")
_UNAUTHORIZED = b'{"error":"Unauthorized"}'


def _bearer_matches(header: str | None, expected: str) -> bool:
    if not header:
        return False
    parts = header.split(" ", 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return False
    return secrets.compare_digest(parts[1].encode(), expected.encode())


def allowed(method: str, path: str, header: str | None, api_key: str | None, admin_api_key: str | None) -> bool:
    """SGLang's decide_request_auth for the normal and admin-optional levels (pure)."""
    if method == "OPTIONS" or path.startswith(OPEN_PREFIXES):
        return True
    if path.startswith(ADMIN_PREFIXES):
        if admin_api_key:
            return _bearer_matches(header, admin_api_key)
        return _bearer_matches(header, api_key) if api_key else True
    return _bearer_matches(header, api_key) if api_key else True


class ApiKeyMiddleware:
    """The rule above on every HTTP request (added only when a key is set)."""

    def __init__(self, app: Callable, api_key: str | None, admin_api_key: str | None = None) -> None:
        self.app = app
        self.api_key = api_key
        self.admin_api_key = admin_api_key

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = next((value for name, value in scope["headers"] if name == b"authorization"), None)
        header = raw.decode("latin-1") if raw is not None else None
        if allowed(scope["method"], scope["path"], header, self.api_key, self.admin_api_key):
            await self.app(scope, receive, send)
            return
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(_UNAUTHORIZED)).encode())]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": _UNAUTHORIZED})
