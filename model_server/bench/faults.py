"""Fault schedules: ``"10s kill chat-1"`` -> typed, timed events.

Grammar (one ``--fault`` each)::

    <time> <action> <server> [value] [for <duration>]

time/duration: ``10``, ``10s``, ``500ms``, ``1.5m``. Actions, and how they act:

========================  ==========================================  ============
action                    effect                                      through
========================  ==========================================  ============
kill / term               SIGKILL / SIGTERM                           signal
stop                      SIGSTOP (frozen: connections stall)         signal
resume (cont)             SIGCONT                                     signal
hang / unhang             model routes accept and never answer       sim route
500s, 503s, ...  [rate]   that share of requests (default 1) fail     sim route
slow [factor]             every latency x factor (default 10)         sim route
malformed [rate]          200 with a body that is not JSON            sim route
drop [rate]               streams cut after the first chunk           sim route
heal (reset)              every sim fault off                         sim route
========================  ==========================================  ============

``for D`` adds the undoing event D later (stop -> resume, hang -> unhang, a
rate -> 0, slow -> 1); a kill cannot be undone, the launch pipeline restarts it.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from enum import Enum

from model_server.errors import BenchError

__all__ = ["FaultEvent", "ServerAction", "parse_duration_s", "parse_fault", "parse_faults"]


class ServerAction(str, Enum):
    """What a scheduled fault does to one server: a signal to its process, or a change of its simulated faults."""

    kill = "kill"
    term = "term"
    stop = "stop"
    resume = "resume"
    hang = "hang"
    unhang = "unhang"
    errors = "errors"
    slow = "slow"
    malformed = "malformed"
    drop = "drop"
    heal = "heal"


_ALIASES = {
    "cont": "resume",
    "sigkill": "kill",
    "sigterm": "term",
    "sigstop": "stop",
    "sigcont": "resume",
    "reset": "heal",
    "drop-stream": "drop",
}
_SIGNALS = {
    ServerAction.kill: signal.SIGKILL,
    ServerAction.term: signal.SIGTERM,
    ServerAction.stop: signal.SIGSTOP,
    ServerAction.resume: signal.SIGCONT,
}
_DEFAULT_VALUE = {  # the rate or factor of a spec that gives none
    ServerAction.errors: 1.0,
    ServerAction.slow: 10.0,
    ServerAction.malformed: 1.0,
    ServerAction.drop: 1.0,
}
_UNDO = {  # what 'for D' schedules D later: a rate or a factor is set back to its value in _UNDO_VALUE
    ServerAction.stop: ServerAction.resume,
    ServerAction.hang: ServerAction.unhang,
    ServerAction.errors: ServerAction.errors,
    ServerAction.slow: ServerAction.slow,
    ServerAction.malformed: ServerAction.malformed,
    ServerAction.drop: ServerAction.drop,
}
_UNDO_VALUE = {
    ServerAction.errors: 0.0,
    ServerAction.slow: 1.0,
    ServerAction.malformed: 0.0,
    ServerAction.drop: 0.0,
}
_DURATION = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(ms|s|m)?$")
_STATUS = re.compile(r"^([45]\d\d)s$")
_HELP = (
    "Write it as '<time> <action> <server> [value] [for <duration>]', e.g. '10s kill chat-1', "
    "'20s stop chat-2 for 5s', '5s 500s chat-3 0.5', '8s slow chat-1 10'; actions: kill, term, stop, resume, "
    "hang, unhang, 500s (any 4xx/5xx code + 's'), slow, malformed, drop, heal."
)


def parse_duration_s(text: str) -> float:
    """``"10"``/``"10s"`` -> 10.0, ``"500ms"`` -> 0.5, ``"1.5m"`` -> 90.0."""
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise ValueError(f"{text!r} is not a duration (like 10s, 500ms, 1.5m)")
    value = float(match.group(1))
    return value * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[match.group(2)]


@dataclass(frozen=True)
class FaultEvent:
    """One fault at one time on one server."""

    at_s: float
    action: ServerAction
    server: str
    value: float | None = None  # a rate or a slow factor
    status: int | None = None  # for errors: the HTTP status the sim answers
    undo: bool = False  # the undoing event of a 'for D' fault: applied at the end of a run if not yet due

    @property
    def signal(self) -> int | None:
        """The signal to send, for signal faults."""
        return _SIGNALS.get(self.action)

    def sim_faults(self) -> dict | None:
        """The JSON body for POST /sim/faults, for simulator faults (heal: {} means /sim/reset)."""
        if self.action is ServerAction.hang:
            return {"hang": True}
        if self.action is ServerAction.unhang:
            return {"hang": False}
        if self.action is ServerAction.errors:
            return {"error_rate": self.value, "error_status": self.status or 500}
        if self.action is ServerAction.slow:
            return {"slow_factor": self.value}
        if self.action is ServerAction.malformed:
            return {"malformed_rate": self.value}
        if self.action is ServerAction.drop:
            return {"drop_stream_rate": self.value}
        if self.action is ServerAction.heal:
            return {}
        return None

    def describe(self) -> str:
        name = f"{self.status}s" if self.action is ServerAction.errors else self.action.value
        value = "" if self.value is None else f" {self.value:g}"
        return f"{self.at_s:g}s {name} {self.server}{value}"

    def as_dict(self) -> dict:
        return {
            "at_s": self.at_s,
            "action": self.action.value,
            "server": self.server,
            "value": self.value,
            "status": self.status,
        }


def parse_fault(spec: str) -> list[FaultEvent]:
    """One ``--fault`` text -> its event, plus the undoing event when it says ``for D``."""
    words = spec.split()
    problem = None
    events: list[FaultEvent] = []
    try:
        if len(words) < 3:
            raise ValueError("it needs at least a time, an action and a server")
        at_s = parse_duration_s(words[0])
        word = words[1].lower()
        status = None
        status_match = _STATUS.match(word)
        if status_match:
            action, status = ServerAction.errors, int(status_match.group(1))
        else:
            try:
                action = ServerAction(_ALIASES.get(word, word))
            except ValueError:
                raise ValueError(f"{words[1]!r} is not a fault action") from None
            if action is ServerAction.errors:
                status = 500
        server = words[2]
        rest = words[3:]
        lasting_s = None
        if len(rest) >= 2 and rest[-2].lower() == "for":
            lasting_s = parse_duration_s(rest[-1])
            rest = rest[:-2]
        value = _DEFAULT_VALUE.get(action)
        if rest:
            if len(rest) > 1 or action not in _DEFAULT_VALUE:
                raise ValueError(f"{' '.join(rest)!r} is not understood after '{words[1]} {server}'")
            value = float(rest[0])
        if action in (ServerAction.errors, ServerAction.malformed, ServerAction.drop) and not 0 <= value <= 1:
            raise ValueError(f"the rate {value:g} is not a share between 0 and 1")
        if action is ServerAction.slow and not value > 0:
            raise ValueError(f"the slow factor {value:g} must be positive")
        events.append(FaultEvent(at_s, action, server, value, status))
        if lasting_s is not None:
            undo = _UNDO.get(action)
            if undo is None:
                raise ValueError(f"'{action.value}' cannot be given a duration ('for ...'): nothing undoes it")
            events.append(FaultEvent(at_s + lasting_s, undo, server, _UNDO_VALUE.get(action), status, undo=True))
    except ValueError as err:
        problem = str(err)
    if problem:
        raise BenchError(f"--fault {spec!r}: {problem}. {_HELP}")
    return events


def parse_faults(
    specs: list[str] | tuple[str, ...], servers: list[str] | tuple[str, ...] | None = None
) -> tuple[FaultEvent, ...]:
    """Every ``--fault``, sorted by time; ``servers`` (when known) must name each target."""
    events = [event for spec in specs for event in parse_fault(spec)]
    if servers is not None:
        for event in events:
            if event.server not in servers:
                raise BenchError(
                    f"--fault names server {event.server!r}, which is not in the target. The servers are: "
                    f"{', '.join(servers) or '(none)'}. Use one of these names."
                )
    return tuple(sorted(events, key=lambda e: e.at_s))
