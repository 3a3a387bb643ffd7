"""A minimal HTTP/1.1 client for server-sent events on asyncio streams: the load generator's fast path.

Why it exists: at 200 requests/s on two cores, httpx (through anyio and
httpcore) costs the generator ~2-3 ms of CPU per streamed request, enough to
make the generator, not the server, the bottleneck on a busy machine. This
client does only what a benchmark needs: keep-alive connections to one
server, a POST with a JSON body, a status line, headers, a chunked or
length-delimited body read line by line. Anything unexpected closes the
connection and raises; the one resend is of a request whose kept-alive
connection the server had already closed (nothing of it was received).
Deadlines belong to the caller (the runner wraps every request in a
timeout); connecting has its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from model_server.common.aio import within
from model_server.common.urls import host_for_url

__all__ = ["RawHTTPError", "RawPool", "RawStatusError"]

_MAX_HEADER_LINES = 100


class RawHTTPError(Exception):
    """The connection or the HTTP framing failed."""


class RawStatusError(RawHTTPError):
    """A non-2xx answer."""

    def __init__(self, status_code: int, body: bytes) -> None:
        super().__init__(f"HTTP {status_code}: {body[:100].decode('utf-8', 'replace')}")
        self.status_code = status_code


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        try:
            self.writer.close()
        except RuntimeError:  # the loop is closing
            pass


class RawPool:
    """Keep-alive connections to one server (``http://host:port``); idle ones are reused."""

    def __init__(self, base_url: str, *, connect_timeout_s: float = 3.0, max_idle: int = 1024) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the raw client speaks plain http only, got {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self.max_idle = max_idle
        self._idle: list[_Conn] = []
        self.host_header = f"{host_for_url(self.host)}:{self.port}".encode()
        self.opened = 0  # connections made so far (keep-alive reuse shows as opened << requests)

    async def _acquire(self) -> tuple[_Conn, bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn, True
            conn.close()
        return await self._fresh(), False

    def _release(self, conn: _Conn) -> None:
        if len(self._idle) < self.max_idle and not conn.writer.is_closing():
            self._idle.append(conn)
        else:
            conn.close()

    async def stream_lines(self, path: str, body: bytes, headers: dict[str, str]) -> AsyncIterator[bytes]:
        """POST ``body`` to ``path`` (under the base URL's path) and yield the answer's lines (no line ends)."""
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
        request = (
            b"POST "
            + (self.prefix + path).encode()
            + b" HTTP/1.1\r\nHost: "
            + self.host_header
            + b"\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n"
            + extra
            + b"\r\n"
            + body
        )
        conn, reused = await self._acquire()
        clean = False
        try:
            try:
                status_line = await _send(conn, request)
            except (ConnectionError, OSError):
                if not reused:
                    raise
                status_line = b""
            if not status_line and reused:
                # The server closed a kept-alive connection before reading this
                # request: nothing was received, so send it once on a new one.
                conn.close()
                conn = await self._fresh()
                status_line = await _send(conn, request)
            status = _status(status_line)
            length, chunked, keep_alive = await _headers(conn.reader)
            if not 200 <= status < 300:
                data = await _read_body(conn.reader, length, chunked)
                clean = keep_alive
                raise RawStatusError(status, data)
            async for line in _body_lines(conn.reader, length, chunked):
                yield line
            clean = keep_alive
        except asyncio.IncompleteReadError as err:
            raise RawHTTPError(
                f"the connection closed in the middle of the answer ({len(err.partial)} bytes into a read)"
            ) from None
        finally:
            if clean:
                self._release(conn)
            else:
                conn.close()

    async def _fresh(self) -> _Conn:
        reader, writer = await within(asyncio.open_connection(self.host, self.port), self.connect_timeout_s)
        self.opened += 1
        return _Conn(reader, writer)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        for conn in idle:
            try:
                await within(conn.writer.wait_closed(), 1.0)
            except (OSError, TimeoutError, RuntimeError):
                pass


async def _send(conn: _Conn, request: bytes) -> bytes:
    conn.writer.write(request)
    return await conn.reader.readline()


def _status(line: bytes) -> int:
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        if not line:
            raise RawHTTPError("the server closed the connection without answering")
        raise RawHTTPError(f"not an HTTP/1.1 status line: {line[:80]!r}")
    return int(parts[1])


async def _headers(reader: asyncio.StreamReader) -> tuple[int | None, bool, bool]:
    length: int | None = None
    chunked = False
    keep_alive = True
    for _ in range(_MAX_HEADER_LINES):
        line = await reader.readline()
        if line in (b"\r\n", b"\n"):
            return length, chunked, keep_alive
        if not line:
            raise RawHTTPError("the connection closed inside the headers")
        name, _, value = line.partition(b":")
        key = name.strip().lower()
        if key == b"content-length":
            length = int(value.strip())
        elif key == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif key == b"connection":
            keep_alive = b"close" not in value.lower()
    raise RawHTTPError(f"more than {_MAX_HEADER_LINES} header lines")


async def _read_body(reader: asyncio.StreamReader, length: int | None, chunked: bool) -> bytes:
    parts = [line async for line in _body_chunks(reader, length, chunked)]
    return b"".join(parts)


async def _body_chunks(reader: asyncio.StreamReader, length: int | None, chunked: bool) -> AsyncIterator[bytes]:
    if chunked:
        while True:
            size_line = await reader.readline()
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                if not size_line:
                    raise RawHTTPError("the connection closed in the middle of the answer") from None
                raise RawHTTPError(f"bad chunk size line {size_line[:40]!r}") from None
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    elif length is not None:
        if length:
            yield await reader.readexactly(length)
    else:
        yield await reader.read()  # until the server closes (no keep-alive then)


async def _body_lines(reader: asyncio.StreamReader, length: int | None, chunked: bool) -> AsyncIterator[bytes]:
    pending = b""
    async for chunk in _body_chunks(reader, length, chunked):
        pending += chunk
        if b"\n" in pending:
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.rstrip(b"\r")
    if pending:
        yield pending.rstrip(b"\r")
