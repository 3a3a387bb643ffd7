"""A rolling restart of one group's servers on this host: the pure decisions, apart from the thread that acts.

The control API's ``POST /groups/{group}/rollout`` starts one; a thread of
:class:`~model_server.launcher.fleet_control.FleetControl` drives it by
asking :func:`advance` what to do next with what it sees of the current
server (its state and pid, from the status board), and doing it::

    for each server of the group on this host, in table order:
        WAITING   its turn came: once it is READY, ask its restart (drain, then restart)  -> RESTARTING
        RESTARTING  once it is READY again with another pid: the next server (or DONE after the last)
    any turn -- the server FAILED or STOPPED, its restart refused, undrained, or not back in time --> FAILED (why)
    any turn -- the pipeline stops --> CANCELLED

One server of the group is out of service at a time: the next restart is
asked only once the one before is READY again. How long a server may take is
:func:`per_server_bound_s` (its drain, its stop, its start, and a margin).

:func:`after_command` is the same judgement for one server's drain or
restart; ``model-server drain|restart`` use it to know when they are done.
Everything here is a function of its arguments, with the clock passed in.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from model_server.config import LaunchPolicy
from model_server.launcher.lifecycle import ServerState

__all__ = [
    "FINISHED",
    "KEEP_WATCHING",
    "MARGIN_S",
    "Action",
    "AskRestart",
    "Finished",
    "KeepWatching",
    "Restarted",
    "Rollout",
    "RolloutState",
    "Seen",
    "advance",
    "after_command",
    "begin",
    "cancel",
    "per_server_bound_s",
    "refused",
    "rollout_refusal",
]

S = ServerState
MARGIN_S = 30.0  # beyond drain + stop + start: GPU reads, backoff slices, the health probe that sees it READY
_GONE = (S.FAILED.value, S.STOPPED.value)


def per_server_bound_s(policy: LaunchPolicy) -> float:
    """How long one server may take to drain, stop and be READY again before a rollout gives up on it."""
    return policy.drain_timeout_s + policy.stop_grace_s + policy.startup_timeout_s + MARGIN_S


@dataclass(frozen=True)
class Seen:
    """A server as the status board shows it now: its state (a ServerState value) and its engine's pid."""

    state: str
    pid: int | None


def after_command(
    then: Literal["stop", "restart"], seen: Seen, old_pid: int | None, left_ready: bool
) -> tuple[bool, str] | None:
    """Whether a server asked to drain then ``then`` is through: (True, "") done, (False, why) not, None not yet.

    ``old_pid`` is its engine's pid when the command was accepted; ``left_ready``
    whether it has been seen in another state than READY since then (a READY
    server with the old pid after that was undrained by someone).
    """
    if then == "stop":
        if seen.state == S.STOPPED.value:
            return True, ""
        if seen.state == S.FAILED.value:
            return False, "it ended FAILED instead of STOPPED (see its last error)"
    else:
        if seen.state == S.READY.value and seen.pid is not None and seen.pid != old_pid:
            return True, ""
        if seen.state in _GONE:
            return False, f"it ended {seen.state} instead of READY again (see its last error)"
    if seen.state == S.READY.value and left_ready and seen.pid == old_pid:
        return False, f"it was undrained (READY with the same pid {old_pid}) before its {then}"
    return None


def rollout_refusal(
    group: str,
    host_groups: Mapping[str, Sequence[str]],
    states: Mapping[str, str],
    running: Rollout | None,
    closed: bool = False,
) -> tuple[int, str] | None:
    """Why a rollout of ``group`` cannot begin now, as (HTTP status, message with the fix); None: it can.

    ``host_groups`` maps each group of this host to its servers here;
    ``states`` the servers' states; ``running`` the group's last rollout.
    """
    if group not in host_groups:
        here = "; ".join(f"{g} ({', '.join(names)})" for g, names in host_groups.items()) or "none"
        return 404, (
            f"no server of group {group!r} runs on this host, so there is nothing to roll out here. This host's "
            f"groups: {here}. Check the group's name, and which host runs it (model-server status)"
        )
    if closed:
        return 409, f"cannot roll out group {group!r}: the pipeline is stopping"
    if running is not None and running.state is RolloutState.RUNNING:
        return 409, (
            f"a rollout of group {group!r} is already running (id {running.id}, on {running.current}). Wait until it "
            f"ends (GET /status, 'rollouts'), then start another"
        )
    not_ready = [f"{n} is {states.get(n, '?')}" for n in host_groups[group] if states.get(n) != S.READY.value]
    if not_ready:
        return 409, (
            f"cannot roll out group {group!r}: every server of it here must be READY first, and "
            f"{'; '.join(not_ready)}. "
            f"Wait until it is READY, start it (POST /servers/<name>/start), or undrain it "
            f"(POST /servers/<name>/undrain), then roll out again"
        )
    return None


class RolloutState(str, enum.Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Restarted:
    """One server the rollout restarted: its engine's pid before and after, and how long it took."""

    server: str
    old_pid: int | None
    new_pid: int | None
    took_s: float


@dataclass(frozen=True)
class Rollout:
    """One rollout of one group on this host; never mutated (every step returns a new one)."""

    id: str
    group: str
    servers: tuple[str, ...]
    bound_s: float  # how long each server may take (per_server_bound_s)
    started_s: float  # the driver's monotonic clock
    started_wall_s: float  # for people: time.time() when it began
    state: RolloutState = RolloutState.RUNNING
    restarted: tuple[Restarted, ...] = ()
    phase: Literal["waiting", "restarting"] = "waiting"
    turn_s: float = 0.0  # when the current server's turn (or its restart) began
    old_pid: int | None = None
    left_ready: bool = False
    why: str = ""
    ended_s: float | None = None

    @property
    def done(self) -> tuple[str, ...]:
        return tuple(r.server for r in self.restarted)

    @property
    def current(self) -> str | None:
        """The server being restarted (or, once the rollout failed or was cancelled, the one it stopped on)."""
        index = len(self.restarted)
        return self.servers[index] if index < len(self.servers) and self.state is not RolloutState.DONE else None

    @property
    def left(self) -> tuple[str, ...]:
        """The servers after the current one, not touched yet."""
        return self.servers[len(self.restarted) + 1 :]

    def as_json(self, now: float) -> dict[str, Any]:
        """What ``GET /status`` shows under ``rollouts``; ``now`` on the same clock as ``started_s``."""
        return {
            "id": self.id, "group": self.group, "state": self.state.value, "servers": list(self.servers),
            "done": list(self.done), "current": self.current, "phase": self.phase if self.current else None,
            "left": list(self.left), "why": self.why, "started": self.started_wall_s,
            "elapsed_s": round((self.ended_s if self.ended_s is not None else now) - self.started_s, 3),
            "bound_per_server_s": self.bound_s,
            "restarted": [
                {"server": r.server, "old_pid": r.old_pid, "new_pid": r.new_pid, "took_s": round(r.took_s, 3)}
                for r in self.restarted
            ],
        }  # fmt: skip


@dataclass(frozen=True)
class AskRestart:
    """Action: hand ``server`` the command restart (drain, then restart)."""

    server: str


@dataclass(frozen=True)
class KeepWatching:
    """Action: look again a moment later."""


@dataclass(frozen=True)
class Finished:
    """Action: none left; the rollout has ended (its state says how)."""


Action = AskRestart | KeepWatching | Finished
KEEP_WATCHING = KeepWatching()
FINISHED = Finished()


def begin(rollout_id: str, group: str, servers: Sequence[str], bound_s: float, now: float, wall_now: float) -> Rollout:
    """A rollout of ``servers`` (in this order), the first one's turn beginning now."""
    if not servers:
        raise ValueError("a rollout needs at least one server")
    return Rollout(rollout_id, group, tuple(servers), bound_s, now, wall_now, turn_s=now)


def _end(r: Rollout, state: RolloutState, why: str, now: float) -> Rollout:
    return replace(r, state=state, why=why, ended_s=now)


def _failed(r: Rollout, why: str, now: float) -> Rollout:
    untouched = ", ".join(r.left) or "none"
    done = ", ".join(r.done) or "none"
    return _end(
        r, RolloutState.FAILED,
        f"server {r.current}: {why}. The rollout stopped there (restarted: {done}; not restarted: {untouched})",
        now,
    )  # fmt: skip


def advance(r: Rollout, seen: Seen, now: float) -> tuple[Rollout, Action]:
    """The next rollout and what to do, from ``seen`` (the current server now) at ``now``."""
    if r.state is not RolloutState.RUNNING:
        return r, FINISHED
    name = r.current
    assert name is not None  # running: a server's turn
    waited_s = now - r.turn_s
    if r.phase == "waiting":
        if seen.state == S.READY.value:
            return replace(r, phase="restarting", turn_s=now, old_pid=seen.pid, left_ready=False), AskRestart(name)
        if seen.state in _GONE:
            return _failed(r, f"it is {seen.state}, so it cannot be restarted", now), FINISHED
        if waited_s > r.bound_s:
            return _failed(
                r, f"it was not READY within {r.bound_s:g} s of its turn (it is {seen.state})", now
            ), FINISHED
        return r, KEEP_WATCHING
    left_ready = r.left_ready or seen.state != S.READY.value
    outcome = after_command("restart", seen, r.old_pid, left_ready)
    if outcome is not None:
        ok, why = outcome
        if not ok:
            return _failed(r, why, now), FINISHED
        restarted = (*r.restarted, Restarted(name, r.old_pid, seen.pid, waited_s))
        r = replace(r, restarted=restarted, phase="waiting", turn_s=now, old_pid=None, left_ready=False)
        if len(r.restarted) == len(r.servers):
            return _end(r, RolloutState.DONE, "", now), FINISHED
        return r, KEEP_WATCHING
    if waited_s > r.bound_s:
        why = (
            f"not READY again within {r.bound_s:g} s (launch.drain_timeout_s + stop_grace_s + startup_timeout_s + "
            f"{MARGIN_S:g} s); it is {seen.state}"
        )
        return _failed(r, why, now), FINISHED
    return (replace(r, left_ready=left_ready) if left_ready != r.left_ready else r), KEEP_WATCHING


def refused(r: Rollout, why: str, now: float) -> Rollout:
    """The current server's restart was refused (its state moved between the look and the command)."""
    return _failed(r, f"its restart was refused: {why}", now) if r.state is RolloutState.RUNNING else r


def cancel(r: Rollout, why: str, now: float) -> Rollout:
    """Stop a running rollout (the pipeline is stopping); an ended one stays as it is."""
    return _end(r, RolloutState.CANCELLED, why, now) if r.state is RolloutState.RUNNING else r
