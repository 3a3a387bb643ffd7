"""The record of every state transition: one log line, one JSONL line in the run directory, and recent memory.

Each transition is written once, here, in one format (time, server, from, to,
reason), so the log, ``events.jsonl`` (for a post-mortem after the pipeline is
gone) and the control API's ``GET /events`` always agree. Reasons are redacted
before they go anywhere.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_server.launcher.lifecycle import ServerState

__all__ = ["EVENTS_FILE_NAME", "EventLog", "Transition"]

log = logging.getLogger("model_server.launcher.supervisor")  # where a server's life was always logged
EVENTS_FILE_NAME = "events.jsonl"
KEEP_RECENT = 1000  # transitions kept in memory for GET /events


@dataclass(frozen=True)
class Transition:
    """One server going ``old -> new`` at ``time`` (wall clock, seconds since the epoch), and why."""

    time: float
    server: str
    old: str
    new: str
    reason: str

    def as_json(self) -> dict[str, Any]:
        return {"time": self.time, "server": self.server, "from": self.old, "to": self.new, "reason": self.reason}


class EventLog:
    """Thread-safe sink of transitions; ``path`` None keeps no file (a supervisor outside a pipeline)."""

    def __init__(
        self,
        path: Path | None = None,
        redact: Callable[[str], str] = lambda text: text,
        clock: Callable[[], float] = time.time,
        keep: int = KEEP_RECENT,
    ) -> None:
        self.path = path
        self._redact = redact
        self._clock = clock
        self._recent: deque[Transition] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Transition], None]] = []
        self._file_broken = False

    def listen(self, listener: Callable[[Transition], None]) -> None:
        """Call ``listener`` after every transition (the metrics' time to READY)."""
        self._listeners.append(listener)

    def record(self, server: str, old: ServerState, new: ServerState, reason: str = "") -> Transition:
        reason = self._redact(reason)
        said = f" ({reason})" if reason else ""
        level = logging.ERROR if new is ServerState.FAILED else logging.INFO
        log.log(level, "server %s: %s -> %s%s", server, old.value, new.value, said)
        event = Transition(self._clock(), server, old.value, new.value, reason)
        with self._lock:
            self._recent.append(event)
            self._append(event)
        for listener in self._listeners:
            listener(event)
        return event

    def recent(self, limit: int | None = None) -> list[Transition]:
        with self._lock:
            events = list(self._recent)
        return events[-limit:] if limit else events

    def _append(self, event: Transition) -> None:
        if self.path is None or self._file_broken:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as out:
                out.write(json.dumps(event.as_json()) + "\n")
        except OSError as err:  # the log still has every transition
            self._file_broken = True
            log.error("cannot append to the events file %s (%s): transitions go to the log only", self.path, err)
