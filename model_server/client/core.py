"""The client's state and the decisions that read it: the table, the groups, the policy (no I/O).

:class:`ClientCore` resolves groups and policies, starts a call's
:class:`~model_server.client.request_plan.RequestState` and plan, turns an
attempt's exception into its outcome, decides whether a broken stream is
resumed, and marks the run-state file. The flows of
:mod:`model_server.client.base` ask it; the drivers never do.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from model_server.client.answer import StreamAssembly
from model_server.client.control_listener import control_view_for
from model_server.client.deadlines import GroupTiming
from model_server.client.metrics import ClientMetrics
from model_server.client.replica import EndpointSnapshot
from model_server.client.replica_group import Lease, ReplicaGroup
from model_server.client.request_plan import Call, CallResult, Done, Probe, RequestState, request_plan
from model_server.client.requests import ChatRequest
from model_server.client.resume import continuation_body, why_no_resume
from model_server.client.retry import Attempt, OutcomeKind, classify, rejected_from
from model_server.client.runstate import mark_not_running
from model_server.client.segments import SegmentTally, StallClock
from model_server.client.wire import DeadlineExceeded, ReplicaHTTPError, error_message
from model_server.common.urls import bearer_headers
from model_server.config import ClientPolicy, Fleet, ServerKind, load_fleet
from model_server.errors import (
    ClientError,
    ConfigError,
    GroupUnavailableError,
    InvalidRequestError,
    RequestRejectedError,
    StreamInterruptedError,
    UnknownGroupError,
)

__all__ = ["POOL_CONNECTIONS", "POOL_KEEPALIVE", "ClientCore", "fleet_from"]

Clock = Callable[[], float]
Rng = random.Random


def fleet_from(config: str | os.PathLike[str] | Fleet | None) -> Fleet:
    """The table a client uses: the one given, else the default for this machine (see common/fleet_choice.py)."""
    if config is None:
        from model_server.common.fleet_choice import default_fleet_path

        config = default_fleet_path()  # $MODEL_SERVER_CONFIG, servers.toml on its hosts, else (no GPU) local.toml
    return config if isinstance(config, Fleet) else load_fleet(config)


log = logging.getLogger("model_server.client")

POOL_CONNECTIONS = 256  # per ModelServer: room for 64+ threads on several replicas
POOL_KEEPALIVE = 128


class ClientCore:
    """What the sync and async clients share: the table, the groups, the policy, the decisions."""

    def __init__(
        self, fleet: Fleet, policy: ClientPolicy, state: Path | None, metrics: ClientMetrics, clock: Clock, rng: Rng
    ):
        self.fleet, self.policy, self.state_path = fleet, policy, state
        self.metrics, self.clock, self.rng = metrics, clock, rng
        problems = fleet.through_gateway_problems(policy)  # the table's own [client] was checked as it loaded
        if problems:
            raise ConfigError(f"{fleet.source}: " + "; ".join(problems) + ".")
        # Per group (a gateway may ask for its own key); a missing one is said now. Where some groups go through
        # gateways, the engines' key is asked when a group that does not is first used: an application that
        # uses only gateways need not hold it.
        through = policy.through_gateway
        self._keys = {g: fleet.client_api_key(g, policy) for g in fleet.groups if not through or g in through}
        self.view = control_view_for(fleet, policy, clock)  # None: no control API to listen to
        metrics.watch(self.stats)
        self._groups: dict[str, ReplicaGroup] = {}
        self._lock = threading.Lock()
        self.closed = False  # set by close()/aclose(): no new background re-probes

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(self.fleet.groups)

    def group(self, name: str | int, kind: ServerKind | None = None) -> ReplicaGroup:
        if not isinstance(name, (str, int)) or isinstance(name, bool):
            raise InvalidRequestError(
                f"the group must be a string such as '8' (or an int), got {type(name).__name__}.", argument="group"
            )
        key = str(name)
        with self._lock:
            group = self._groups.get(key)
            if group is None:
                specs = self.fleet.client_replicas(key, self.policy)
                if specs and key not in self._keys:
                    self._keys[key] = self.fleet.client_api_key(key, self.policy)
                if not specs:
                    raise UnknownGroupError(key, self.group_names, self.fleet.source)
                view = None if key in self.policy.through_gateway else self.view  # a gateway follows on its own
                group = self._groups[key] = ReplicaGroup(key, specs, self.policy, clock=self.clock, view=view)
        if kind is not None and group.kind is not kind:
            other = "embed()" if group.kind is ServerKind.embedding else "chat() or stream_chat()"
            raise RequestRejectedError(
                f"group '{key}' serves {group.kind.value} models, not {kind.value}: use {other} for it, "
                f"or ask a {kind.value} group.",
                status=None,
            )
        return group

    def warmup_groups(self, groups: Any) -> dict[str, ReplicaGroup]:
        """The groups a warmup builds: those named, else every group of the table."""
        names = [str(g) for g in (groups if groups is not None else self.group_names)]
        return {name: self.group(name) for name in names}

    @staticmethod
    def fresh_probe(group: ReplicaGroup) -> Probe:
        """A probe round outside any request (warmup, re-probe): the group's own limits."""
        return Probe(group.probe_rounds, group.probe_timeout_s(), group.probe_wait_s())

    @staticmethod
    def joined_round(group: ReplicaGroup, probe: Probe) -> bool | None:
        """With the probe lock held: the result of a round another caller finished meanwhile, or None."""
        return group.last_round_found if group.probe_rounds > probe.seen_rounds else None

    def probe_kwargs(self, group: str) -> dict[str, Any]:
        return {"api_key": self._keys.get(group), "connect_timeout_s": self.policy.connect_timeout_s}

    def headers(self, group: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        key = self._keys.get(group)
        headers = {"Content-Type": "application/json", "Accept": "application/json", **bearer_headers(key)}
        headers.update(extra or {})
        return headers

    # ---- one call -------------------------------------------------------------------------

    def new_state(self) -> RequestState:
        return RequestState(self.policy, self.clock())

    def plan(self, group: ReplicaGroup, state: RequestState, hold_lease: bool = False, prompt_tokens: int = 0):
        return request_plan(
            group,
            self.policy,
            state,
            rng=self.rng,
            clock=self.clock,
            metrics=self.metrics,
            hold_lease=hold_lease,
            prompt_tokens=prompt_tokens,
        )

    def unavailable(self, group: ReplicaGroup) -> None:
        if self.state_path is not None:
            mark_not_running(self.state_path)
        log.error("group '%s' is unavailable: no replica answered within the call's bounds", group.name)

    def raise_if_dead(self, groups: dict[str, ReplicaGroup], found: dict[str, bool]) -> None:
        """After a warmup: GroupUnavailableError (listing each replica's last error) for a group nobody answered in."""
        for name, ok in found.items():
            if not ok:
                self.unavailable(groups[name])
                attempts = [Attempt(s.name, s.last_error or "no answer", 0.0) for s in groups[name].snapshot().values()]
                raise GroupUnavailableError(
                    name,
                    attempts,
                    f"no replica answered {self.policy.build_rounds} probe round(s) (client.build_rounds)",
                )

    def timing(self, name: str | int) -> GroupTiming:
        group = self.group(name)
        deadlines = group.attempt_deadlines()
        return GroupTiming(group.timing.ttft_s, group.timing.gap_s, deadlines.first_token_s, deadlines.stall_s)

    def stats(self) -> dict[str, dict[str, EndpointSnapshot]]:
        with self._lock:
            groups = list(self._groups.values())
        return {g.name: g.snapshot() for g in groups}

    @staticmethod
    def http_error(status: int, raw: bytes) -> ReplicaHTTPError:
        text = raw[:2000].decode("utf-8", "replace")
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = text
        return ReplicaHTTPError(status, body, error_message(body, text or f"HTTP {status}"))

    @staticmethod
    def failed(group: ReplicaGroup, call: Call, err: Exception) -> CallResult:
        """The outcome of an attempt that raised; an error that is not the replica's doing is re-raised."""
        kind = classify(err)
        if kind is None:
            group.release(call.lease, None)
            raise err
        return CallResult(kind, error=err)

    def reprobe_after(self, done: Done) -> bool:
        """Whether the finished request asks for a background re-probe."""
        return done.reprobe and not self.closed

    # ---- streams: deadlines, segments and resumes -------------------------------------------

    def check_first_token(self, call: Call) -> None:
        """DeadlineExceeded once an attempt has had its first-token time without a token (checked per chunk)."""
        if self.clock() - call.lease.started_s > call.deadlines.first_token_s:
            raise DeadlineExceeded("first token", call.deadlines.first_token_s, call.lease.spec.name)

    def stall_clock(self, stall_s: float) -> StallClock:
        return StallClock(self.clock, stall_s)

    def segment(self, group: ReplicaGroup, lease: Lease, stall_s: float) -> SegmentTally:
        return SegmentTally(self, group, lease, stall_s)

    def after_break(
        self,
        group: ReplicaGroup,
        req: ChatRequest,
        state: RequestState,
        assembly: StreamAssembly,
        body: dict[str, Any],
        tally: SegmentTally,
    ) -> dict[str, Any] | None:
        """A stream broke after it began: the body that continues it, None if the answer was whole after all,
        or the caller's error (raised)."""
        err = tally.error_obj
        received = assembly.text
        replica = tally.lease.spec.name
        if tally.outcome is OutcomeKind.REJECTED:  # the engine refused to go on (a 4xx error event): not its fault
            if req.call == "chat" or not received:
                raise rejected_from(err, replica) from err
            raise StreamInterruptedError(
                group.name,
                replica,
                received,
                tally.error,
                why_not_resumed="the replica refused to go on with it",
                resumes=state.resumes,
            ) from err
        limit = req.body.get("max_tokens") or req.body.get("max_completion_tokens")
        if isinstance(limit, int) and assembly.tokens >= limit:  # every token asked for had arrived
            assembly.finish_reason = assembly.finish_reason or "length"
            return None
        if not received:  # nothing reached the caller: start over, as a plain failover
            assembly.restart()
            return req.body
        why = why_no_resume(req.not_resumable, state.resumes, self.policy, state.spent(self.clock()) is None)
        if why is not None:
            if req.call == "chat" and state.spent(self.clock()) is None:
                # chat() has shown the caller nothing yet: the whole answer again, within the call's bounds
                log.warning(
                    "group '%s': %s broke mid-answer (%s) and %s: asking again from the start",
                    group.name,
                    replica,
                    tally.error,
                    why,
                )
                assembly.restart()
                return req.body
            raise StreamInterruptedError(
                group.name, replica, received, tally.error, why_not_resumed=why, resumes=state.resumes
            ) from err
        state.resumes += 1
        self.metrics.resume(group.name, replica)
        log.warning(
            "resuming a stream of group '%s': %s broke after %d token(s) (%s); continuing on another replica "
            "(resume %d/%d)",
            group.name,
            replica,
            assembly.tokens,
            tally.error,
            state.resumes,
            self.policy.max_resumes,
        )
        return continuation_body(req.kind, req.body, received, assembly.tokens)

    @staticmethod
    def after_refused(
        group: ReplicaGroup,
        req: ChatRequest,
        state: RequestState,
        assembly: StreamAssembly,
        err: ClientError,
        previous: str | None,
    ) -> dict[str, Any]:
        """No replica took a continuation (spent bounds, or a refusal): raise the caller's error, or start over."""
        if previous is None or not assembly.text:
            raise err
        if req.call == "chat":
            if isinstance(err, RequestRejectedError):  # a continuation refused: the original may still be served
                assembly.restart()
                return req.body
            raise err
        raise StreamInterruptedError(
            group.name,
            previous,
            assembly.text,
            str(state.last_error or "broken"),
            why_not_resumed=f"no replica could continue it ({err})",
            resumes=state.resumes,
        ) from err

    @staticmethod
    def ends_whole(assembly: StreamAssembly, err: BaseException) -> bool:
        """A stream that broke after its finish reason arrived (before [DONE]) is a whole answer."""
        return assembly.finished and classify(err) in (
            OutcomeKind.CONNECTION,
            OutcomeKind.TIMEOUT,
            OutcomeKind.MALFORMED,
        )

    def note_resumed(self, group: ReplicaGroup, previous: str, lease: Lease, assembly: StreamAssembly) -> None:
        log.warning(
            "stream of group '%s' resumed on %s after %s broke (%d token(s) carried over)",
            group.name,
            lease.spec.name,
            previous,
            assembly.tokens_before,
        )
