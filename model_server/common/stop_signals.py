"""The stop signals of a long run (``model-server serve``, ``model-server gateway``) as a flag its loop polls.

The handler only records the signal (no locks, no logging in a handler); the
loop sees it on its next poll and stops the run. Handlers can only be
installed from the main thread, so elsewhere (a test running the loop in a
thread) :meth:`StopFlag.handling` installs none and only :meth:`StopFlag.request` stops it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["STOP_SIGNALS", "StopFlag"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class StopFlag:
    """The signal that asked the run to stop: ``signum`` is None until one did."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Stop as on ``signum`` (from another thread, or a test)."""
        self.signum = signum

    @contextlib.contextmanager
    def handling(self, install: bool = True) -> Iterator[None]:
        """Within the block, the stop signals set the flag (with ``install``, from the main thread); then the
        handlers from before are back."""
        previous = self._install() if install else {}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _install(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self._handler) for sig in STOP_SIGNALS}

    def _handler(self, signum: int, _frame: object) -> None:
        self.signum = signum
