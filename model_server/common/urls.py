"""URLs and auth headers for a server at (host, port): one home, IPv6-correct.

An IPv6 literal needs brackets in a URL (``http://[::1]:30000``) and none in a
bind address or a ``--host`` flag; every URL of a replica, a health check, a
probe or a control API is built here so none forgets them.
"""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["bearer_headers", "host_for_url", "reachable_host", "same_url", "server_url", "url_key"]

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


def host_for_url(host: str) -> str:
    """``host`` as it goes between ``//`` and ``:port``: IPv6 literals in brackets, once."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


def reachable_host(host: str) -> str:
    """Where this machine reaches a server bound to ``host``: a wildcard bind address means loopback."""
    return _WILDCARDS.get(host, host)


def server_url(host: str, port: int, path: str = "") -> str:
    """``http://host:port`` plus ``path`` (which starts with ``/`` when given)."""
    return f"http://{host_for_url(host)}:{port}{path}"


def bearer_headers(api_key: str | None) -> dict[str, str]:
    """The ``Authorization`` header SGLang (and our control API) expect, or none without a key."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def url_key(url: str) -> tuple[str, str, int | None, str]:
    """A URL as two parties may both spell it (a gateway and the table): scheme and host lower-cased, no
    trailing /, so the two compare equal."""
    parts = urlsplit(url.strip())
    try:
        port = parts.port
    except ValueError:
        port = None
    return parts.scheme.lower(), (parts.hostname or "").lower(), port, parts.path.rstrip("/")


def same_url(a: str, b: str) -> bool:
    """Whether two URLs name the same server (case of scheme and host, a trailing / ignored)."""
    return url_key(a) == url_key(b)
