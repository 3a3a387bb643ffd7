"""The words between the supervisor's pure step and the loop that acts for it: events in, actions out.

Events are what the loop saw (a GPU reading, a port check, a probe's answer,
the engine's exit, the timer, a stop); actions are what the step asks for
(read the GPUs, check the port, spawn, probe, kill, publish a state, log a
note, wait until a time). An asking action names the events that answer it;
the others are done and answered by nothing. All are frozen values, so a test
scripts the events and compares the actions it gets back. No I/O here.
They are made on every step, so they have slots: small, and no stray attribute.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from model_server.launcher.command import LaunchCommand
from model_server.launcher.gpu_memory import GpuProcess, GpuReading
from model_server.launcher.lifecycle import ServerState

__all__ = [
    "Action",
    "BareAction",
    "BareEvent",
    "CheckPort",
    "Command",
    "EngineExited",
    "Event",
    "Get",
    "GpusRead",
    "Note",
    "PortChecked",
    "Probe",
    "Probed",
    "Publish",
    "ReadGpus",
    "ReadRunning",
    "Refused",
    "RunningRead",
    "Spawn",
    "Spawned",
    "Wait",
]

# ---- time, and the ends that come from outside -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Wait:
    """Action: sleep until ``until_s`` on the supervisor's clock.

    Answered by ``BareEvent.TICK``, or earlier by the engine's exit or a stop.
    """

    until_s: float


class BareEvent(enum.Enum):
    """Events that carry nothing but what they are."""

    TICK = "a Wait reached its time (or, first of all, the supervisor began)"
    STOP_REQUESTED = "the pipeline is stopping; it has taken the running engine over and ends it itself"


@dataclass(frozen=True, slots=True)
class Refused:
    """Event: an action failed in a way that ends the server (unknown GPU, unwritable log, no such program, ...)."""

    reason: str


# ---- the GPUs and the port ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadGpus:
    """Action: read ``indices``, naming the processes on those with ``free_below_mib`` used or more.

    Answered by :class:`GpusRead`.
    """

    indices: tuple[int, ...]
    free_below_mib: int


@dataclass(frozen=True, slots=True)
class GpusRead:
    """Event: the server's GPUs, read; ``holders`` are NVML's processes on the busy ones, each with its description."""

    readings: tuple[GpuReading, ...]
    holders: tuple[tuple[GpuProcess, str], ...] = ()


@dataclass(frozen=True, slots=True)
class CheckPort:
    """Action: is ``host:port`` taken?

    Answered by :class:`PortChecked`; who holds it is looked up (psutil, slow) only when ``name_holder``.
    """

    host: str
    port: int
    name_holder: bool = False


@dataclass(frozen=True, slots=True)
class PortChecked:
    """Event: whether the port is taken; ``holder`` ("pid N (cmd)", "" if unknown) when it was asked for, else None."""

    in_use: bool
    holder: str | None = None


# ---- the engine ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spawn:
    """Action: write the key file, start ``command`` in its own process group.

    Answered by :class:`Spawned`, or :class:`Refused` when the program cannot be started (or a stop came first).
    """

    command: LaunchCommand


@dataclass(frozen=True, slots=True)
class Spawned:
    """Event: the engine runs as ``pid`` (the leader of its own process group), started at ``create_time``."""

    pid: int
    create_time: float | None  # None: it ended before its start time could be read


@dataclass(frozen=True, slots=True)
class EngineExited:
    """Event: the engine's process exited (``returncode`` < 0: killed by that signal); ``log_tail`` is its last line."""

    returncode: int | None
    log_tail: str = ""


@dataclass(frozen=True, slots=True)
class Get:
    """An action that reads ``url`` (HTTP GET) within ``timeout_s``; answered by an event, or an exit or a stop."""

    url: str
    timeout_s: float


@dataclass(frozen=True, slots=True)
class Probe(Get):
    """Action: a readiness or health probe. Answered by :class:`Probed`."""


@dataclass(frozen=True, slots=True)
class Probed:
    """Event: a readiness or health probe's outcome: ``ok``, or ``why`` not."""

    ok: bool
    why: str = ""


class BareAction(enum.Enum):
    """Actions that carry nothing but what they are; answered by nothing."""

    KILL_ENGINE = "end the engine's process group and tagged processes (if one runs), and remove the key file"
    REMOVE_KEY_FILE = "the engine has read its key: remove the 0600 file"
    RECORD_WORKERS = "put the engine's descendants (pid, start time) in the status file if they changed"


# ---- the operator, through the control API, and a drain ---------------------------------------------------

Verb = Literal["drain", "undrain", "restart", "stop"]
AfterDrain = Literal["stop", "restart"]


@dataclass(frozen=True, slots=True)
class Command:
    """Event: the operator asked (control API) to ``verb`` this server; a drain then does ``then``.

    ``restart`` drains first and then restarts; ``stop`` stops at once. Delivered
    in place of a Wait's tick, so every phase is between two of its own actions.
    """

    verb: Verb
    then: AfterDrain = "stop"


@dataclass(frozen=True, slots=True)
class ReadRunning(Get):
    """Action: read the engine's ``sglang:num_running_reqs`` from its /metrics. Answered by :class:`RunningRead`."""


@dataclass(frozen=True, slots=True)
class RunningRead:
    """Event: the requests the engine runs now, or None (``why``) when it has no metrics or did not answer."""

    running: int | None
    why: str = ""


# ---- what people see -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Publish:
    """Action: the server went ``old -> new``; log it (with ``detail``) and write ``fields`` to the status file."""

    old: ServerState
    new: ServerState
    detail: str = ""
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Note:
    """Action: a line for the log (progress, a failed probe); the loop puts the server's name in front."""

    level: Literal["info", "warning"]
    message: str


Event = BareEvent | Refused | GpusRead | PortChecked | Spawned | Probed | EngineExited | Command | RunningRead
Action = BareAction | Wait | ReadGpus | CheckPort | Spawn | Probe | ReadRunning | Publish | Note
