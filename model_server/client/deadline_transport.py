"""An httpx transport whose socket reads obey the calling thread's deadline (the sync client's I/O edge).

httpx bounds each socket read by a fixed timeout, so a replica that sends a
byte now and then, or headers and then nothing, can hold a blocking call far
beyond the deadline it was meant to meet. This transport wraps httpcore's
network streams: before every read, write or connect it cuts the timeout to
the time left before the thread's current deadline (:func:`set_deadline`),
and refuses at once once it has passed. The sync client moves that deadline
as an attempt goes on (first token, then the next chunk), so a hung replica
holds a request no longer than the deadline, whatever the SDK or httpx
timeouts say. Threads that set no deadline (probes, other users of the
pool) see plain httpx behaviour.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

__all__ = ["DeadlinePassed", "deadline_transport", "get_deadline", "set_deadline"]

_local = threading.local()


class DeadlinePassed(httpcore.ReadTimeout):
    """The thread's deadline had passed before a read could start (httpx reports it as a ReadTimeout)."""


def set_deadline(deadline_s: float | None) -> None:
    """The current thread's deadline (``time.monotonic()`` seconds) for socket I/O; None lifts it."""
    _local.deadline = deadline_s


def get_deadline() -> float | None:
    return getattr(_local, "deadline", None)


def _bounded(timeout: float | None) -> float | None:
    deadline = getattr(_local, "deadline", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlinePassed("the attempt's deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _bounded(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _bounded(timeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None) -> Any:
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, _bounded(timeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(host, port, _bounded(timeout), local_address, socket_options)
        return _DeadlineStream(stream)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_unix_socket(path, _bounded(timeout), socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def deadline_transport(limits: httpx.Limits) -> httpx.HTTPTransport:
    """An httpx transport (HTTP/1.1, no proxy) whose I/O obeys :func:`set_deadline`."""
    transport = httpx.HTTPTransport(limits=limits, trust_env=False)
    # httpx builds its pool without a network-backend argument; this one is the same pool with ours.
    transport._pool = httpcore.ConnectionPool(  # noqa: SLF001 - the documented httpcore seam, set where httpx keeps it
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=_DeadlineBackend(),
    )
    return transport
