"""Engine logs: the pipeline reads every engine's output through a pipe and writes it, redacted, to its log.

An engine never gets its log file: SGLang prints its API key at startup (see
redact.py), so its stdout and stderr go to a pipe, and a :class:`LogPump`
thread copies them to ``logs/<server>.log`` through a :class:`Redactor`.
Log files are created 0600 (an older one is set to 0600), in a directory
created 0700.

The pump writes whole lines as they come, and a partial line (a progress bar)
once the engine has been quiet for :data:`IDLE_FLUSH_S`, holding back the last
few bytes a secret split between two reads could hide in.
"""

from __future__ import annotations

import os
import select
import threading
from pathlib import Path
from typing import BinaryIO

from model_server.launcher.redact import Redactor

__all__ = ["IDLE_FLUSH_S", "LogPump", "open_log", "write_redacted"]

IDLE_FLUSH_S = 0.5
_READ_BYTES = 65536
_MAX_PENDING_BYTES = 65536


def open_log(path: Path) -> int:
    """An O_APPEND descriptor on ``path``, mode 0600 (its directory made 0700 if new); OSError as the OS says."""
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a log of an older run may have been 0644
    except OSError:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_redacted(fd: int, redactor: Redactor, text: str) -> None:
    """Write one of the pipeline's own lines into an engine log (best effort, like the pump)."""
    try:
        _write_all(fd, redactor.redact_bytes(text.encode("utf-8", "replace")))
    except OSError:
        pass


class LogPump(threading.Thread):
    """Copies ``source`` (an engine's stdout pipe) to the log descriptor ``log_fd``, redacted, until EOF.

    Owns both: closes them at the end. A write error (disk full) is counted and
    the output dropped, never raised: the engine must not block on a full pipe.
    """

    def __init__(self, source: BinaryIO, log_fd: int, redactor: Redactor, name: str = "") -> None:
        super().__init__(name=f"log-{name}" if name else "log", daemon=True)
        self._source = source
        self._fd = log_fd
        self._redactor = redactor
        self._pending = b""
        self.write_errors = 0

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        try:
            _write_all(self._fd, data)
        except OSError:
            self.write_errors += 1

    def _flush(self, everything: bool) -> None:
        data = self._pending
        cut = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
        if everything:
            cut = len(data)
        elif cut == 0 or len(data) - cut > _MAX_PENDING_BYTES:
            # a partial line: redact it all, keep back the tail that may start a secret
            redacted = self._redactor.redact_bytes(data)
            keep = min(len(redacted), self._redactor.hold_back_bytes)
            self._emit(redacted[: len(redacted) - keep])
            self._pending = redacted[len(redacted) - keep :]
            return
        self._emit(self._redactor.redact_bytes(data[:cut]))
        self._pending = data[cut:]

    def run(self) -> None:
        fd = self._source.fileno()
        poller = select.poll()  # not select(): it fails for descriptors above 1023
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        try:
            while True:
                ready = poller.poll(IDLE_FLUSH_S * 1000)
                if not ready:
                    if self._pending:
                        self._flush(everything=False)
                    continue
                try:
                    chunk = os.read(fd, _READ_BYTES)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                self._pending += chunk
                if b"\n" in chunk or b"\r" in chunk or len(self._pending) > _MAX_PENDING_BYTES:
                    self._flush(everything=False)
            self._flush(everything=True)
        finally:
            try:
                self._source.close()
            finally:
                os.close(self._fd)
