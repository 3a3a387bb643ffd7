"""What the client saw during a bench run, from its log: failovers, breaker changes, resumes.

``ModelServer`` logs one WARNING per failover and one per breaker change
(loggers under ``model_server``); at 20 requests/s a kill gives a screenful.
During ``model-server bench`` those lines go to the run's log file instead
(:func:`divert_client_log`, undone by ``--verbose``), and every record is also
read here (:class:`ClientEventLog`) and turned into counts per replica for
the live display and into the effects of each fault (:func:`fault_effects`).

Reading a log is the one way to see this that needs no hook in the client:
:func:`classify` looks at the record's format string for the kind of event
and at its text for the replica (the first server name of the fleet that it
mentions), so it survives small changes of wording. A message that stops
saying "failover", "breaker ... a -> b" or "resumed" is counted as another
warning: tests/test_bench_clientlog.py holds the client's current templates.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

__all__ = [
    "ClientEvent",
    "ClientEventLog",
    "DivertedLog",
    "EventKind",
    "classify",
    "default_log_path",
    "divert_client_log",
    "fault_effects",
    "live_status",
]

CLIENT_ROOT = "model_server"  # the client's loggers all live under it
OWN_OUTPUT = ("model_server.bench", "model_server.cli")  # the bench's own lines stay on the terminal


def _under(name: str, *roots: str) -> bool:
    """``name`` is one of the loggers ``roots`` or a child of one.

    (``model_server.client`` is not under ``model_server.cli``.)
    """
    return any(name == root or name.startswith(root + ".") for root in roots)


_TRANSITION = re.compile(r"\b(closed|open|half_open)\s*->\s*(closed|open|half_open)\b")


class EventKind(str, Enum):
    FAILOVER = "failover"  # a request left a replica for another
    BREAKER = "breaker"  # a replica's circuit breaker changed state
    RESUME = "resume"  # a broken stream went on on another replica
    # any other warning of the client (a stream broke, a replica is degraded, a probe round found no one)
    OTHER = "other"


@dataclass(frozen=True)
class ClientEvent:
    """One client log record, read. ``at_s`` is wall-clock time (``record.created``)."""

    at_s: float
    kind: EventKind
    replica: str | None = None
    old: str | None = None  # breaker: the state before
    new: str | None = None  # breaker: the state after


def _name_pattern(servers: Sequence[str]) -> re.Pattern[str] | None:
    names = sorted({s for s in servers if s}, key=len, reverse=True)  # chat-10 before chat-1
    if not names:
        return None
    return re.compile(r"(?<![\w.@:-])(" + "|".join(re.escape(n) for n in names) + r")(?![\w@:-]|\.\w)")


def classify(
    template: str, text: str, level: int, servers: Sequence[str] | re.Pattern[str] | None
) -> ClientEvent | None:
    """Pure: the event a client record stands for, or None (a line below WARNING that is not a breaker change).

    ``template`` is the record's format string (``record.msg``), ``text`` the formatted message.
    """
    pattern = servers if isinstance(servers, re.Pattern) or servers is None else _name_pattern(servers)
    lowered = str(template).lower()
    transition = _TRANSITION.search(text)
    if "breaker" in lowered and transition:
        kind = EventKind.BREAKER
    elif "failover" in lowered or "failing over" in lowered:
        kind = EventKind.FAILOVER
    elif "resumed" in lowered:  # done: the stream went on on another replica ("resuming ..." is the attempt)
        kind = EventKind.RESUME
    elif level >= logging.WARNING:
        kind = EventKind.OTHER
    else:
        return None
    match = pattern.search(text) if pattern is not None else None
    old, new = (transition.group(1), transition.group(2)) if kind is EventKind.BREAKER and transition else (None, None)
    return ClientEvent(0.0, kind, match.group(1) if match else None, old, new)


class ClientEventLog(logging.Handler):
    """A logging handler that keeps what the client's records say (attach it with :meth:`attached`)."""

    def __init__(self, servers: Sequence[str]) -> None:
        super().__init__(logging.DEBUG)
        self._pattern = _name_pattern(servers)
        self.events: list[ClientEvent] = []
        self.failovers: Counter[str] = Counter()
        self.breaker_changes: Counter[str] = Counter()
        self.breaker_state: dict[str, str] = {}
        self.resumes = 0
        self.other_warnings = 0

    def emit(self, record: logging.LogRecord) -> None:  # called under the handler's lock
        if _under(record.name, *OWN_OUTPUT):
            return
        try:
            event = classify(str(record.msg), record.getMessage(), record.levelno, self._pattern)
        except Exception:  # noqa: BLE001 - a log line must never break a run
            return
        if event is None:
            return
        event = ClientEvent(record.created, event.kind, event.replica, event.old, event.new)
        self.events.append(event)
        key = event.replica or "?"
        if event.kind is EventKind.FAILOVER:
            self.failovers[key] += 1
        elif event.kind is EventKind.BREAKER:
            self.breaker_changes[key] += 1
            self.breaker_state[key] = event.new or "?"
        elif event.kind is EventKind.RESUME:
            self.resumes += 1
        else:
            self.other_warnings += 1

    @contextlib.contextmanager
    def attached(self, logger_name: str = CLIENT_ROOT) -> Iterator[ClientEventLog]:
        logger = logging.getLogger(logger_name)
        logger.addHandler(self)
        try:
            yield self
        finally:
            logger.removeHandler(self)

    def totals(self) -> dict:
        """For the result file: counts per replica."""
        return {
            "failovers": dict(sorted(self.failovers.items())),
            "breaker_changes": dict(sorted(self.breaker_changes.items())),
            "breaker_state_at_end": dict(sorted(self.breaker_state.items())),
            "resumes": self.resumes,
            "other_warnings": self.other_warnings,
        }


def live_status(log: ClientEventLog | None) -> str:
    """One short line for the progress display: failovers per replica, breakers not closed, resumes."""
    if log is None:
        return ""
    log.acquire()  # the client may log from its own threads
    try:
        return _status_of(log)
    finally:
        log.release()


def _status_of(log: ClientEventLog) -> str:
    parts = []
    if log.failovers:
        total = sum(log.failovers.values())
        parts.append(f"failovers {total} (" + ", ".join(f"{r} {n}" for r, n in sorted(log.failovers.items())) + ")")
    not_closed = sorted((r, s) for r, s in log.breaker_state.items() if s != "closed")
    if not_closed:
        parts.append("breaker " + ", ".join(f"{r} {s}" for r, s in not_closed))
    if log.resumes:
        parts.append(f"resumes {log.resumes}")
    return "  ".join(parts)


# ---- what each fault did, as the client saw it ---------------------------------------


def fault_effects(
    faults: Sequence[dict],
    events: Iterable[ClientEvent],
    failed_at_s: Iterable[float],
    *,
    start_wall_s: float,
    end_s: float,
) -> list[dict | None]:
    """Pure: per applied fault (the result's ``faults`` entries), what the client saw; None for an undo.

        A fault's window runs from when it was applied to the next fault (not an undo) on the same
        server, or the end of the run. In it: the failovers off that server, its breaker changes and
    the client's other warnings that name it (such as "degraded");
        the resumed streams and the failed requests are counted for the whole fleet, until the next
        fault on any server. ``seen`` says whether the client noticed the fault at all (a replica
        that was getting no traffic may not be noticed). ``recovered_after_s`` (seconds after the
        fault): when its breaker closed again if it opened, else its last failover or warning; None if
        not seen, or if its breaker was still not closed at the end of the window.
    """
    timed = sorted(((e.at_s - start_wall_s, e) for e in events), key=lambda pair: pair[0])
    failed = sorted(failed_at_s)
    starts = [(f.get("applied_s"), f.get("server"), bool(f.get("undo"))) for f in faults]
    out: list[dict | None] = []
    for f in faults:
        at, server = f.get("applied_s"), f.get("server")
        if f.get("undo") or not f.get("ok") or at is None:
            out.append(None)
            continue
        later = [s for s, _srv, undo in starts if s is not None and s > at and not undo]
        end_same = min(
            (s for s, srv, undo in starts if s is not None and s > at and not undo and srv == server), default=end_s
        )
        end_any = min(later, default=end_s)
        mine = [(t, e) for t, e in timed if at <= t < end_same and e.replica == server]
        failovers = [t for t, e in mine if e.kind is EventKind.FAILOVER]
        breaker = [(t, e) for t, e in mine if e.kind is EventKind.BREAKER]
        warnings = [t for t, e in mine if e.kind is EventKind.OTHER]  # e.g. marked degraded (a slow fault)
        resumes = sum(1 for t, e in timed if at <= t < end_any and e.kind is EventKind.RESUME)
        failed_requests = sum(1 for t in failed if at <= t < end_any)
        recovered: float | None = None
        if breaker:
            last_t, last = breaker[-1]
            recovered = last_t - at if last.new == "closed" else None
        elif failovers or warnings:
            recovered = max(failovers + warnings) - at
        out.append(
            {
                "seen": bool(failovers or breaker or warnings),
                "failovers": len(failovers),
                "warnings": len(warnings),
                "resumes": resumes,
                "failed_requests": failed_requests,
                "breaker": [{"after_s": round(t - at, 3), "from": e.old, "to": e.new} for t, e in breaker],
                "last_failover_after_s": round(failovers[-1] - at, 3) if failovers else None,
                "recovered_after_s": None if recovered is None else round(recovered, 3),
                "window_s": round(end_same - at, 3),
            }
        )
    return out


# ---- the terminal: client lines to the log file ---------------------------------------


class _NotClient(logging.Filter):
    """Drops model_server records other than the bench's own (for the terminal's handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _under(record.name, CLIENT_ROOT) or _under(record.name, *OWN_OUTPUT)


@dataclass
class DivertedLog:
    """Where the lines went (the file exists only if a line was written)."""

    path: Path
    lines: int = 0
    error: str | None = None  # why the file could not be written (the lines then went nowhere)


class _CountingFileHandler(logging.FileHandler):
    def __init__(self, path: Path, diverted: DivertedLog) -> None:
        super().__init__(path, encoding="utf-8", delay=True)  # no file for a run that logs nothing
        self._diverted = diverted
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def _open(self):  # first line: make the directory then, so a quiet run leaves nothing behind
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self._diverted.error is None:
                self._open_or_write(record)
        except OSError as err:  # a log line never ends a run; the CLI says where the lines did not go
            self._diverted.error = err.strerror or str(err)

    def _open_or_write(self, record: logging.LogRecord) -> None:
        if self.stream is None:
            self.stream = self._open()
        logging.StreamHandler.emit(self, record)  # a failed write goes to handleError
        if self._diverted.error is None:
            self._diverted.lines += 1

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        self._diverted.error = self._diverted.error or "a line could not be written"


def default_log_path(log_dir: str | Path, now: float | None = None) -> Path:
    """``<log_dir>/bench-YYYYmmdd-HHMMSS.log``."""
    return Path(log_dir) / time.strftime("bench-%Y%m%d-%H%M%S.log", time.localtime(now))


@contextlib.contextmanager
def divert_client_log(path: Path, *, keep_on_terminal: bool = False) -> Iterator[DivertedLog]:
    """Every model_server record goes to ``path``; unless ``keep_on_terminal``, the client's
    records leave the root logger's handlers (the terminal) while this lasts."""
    diverted = DivertedLog(path)
    logger = logging.getLogger(CLIENT_ROOT)
    handler = _CountingFileHandler(path, diverted)
    quiet = _NotClient()
    terminals = [] if keep_on_terminal else list(logging.getLogger().handlers)
    logger.addHandler(handler)
    for h in terminals:
        h.addFilter(quiet)
    try:
        yield diverted
    finally:
        for h in terminals:
            h.removeFilter(quiet)
        logger.removeHandler(handler)
        handler.close()
