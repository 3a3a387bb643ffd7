"""What ModelServer and AsyncModelServer share: every decision that does not wait.

Nothing here waits on the network: :class:`ClientCore` resolves groups and
policies, turns the caller's arguments into a checked request
(:class:`ChatRequest`, :class:`EmbedRequest`), starts a call's
:class:`~model_server.client.request_plan.RequestState` and plan, turns an
attempt's exception into its outcome, decides whether a broken stream is
resumed, and marks the run-state file. :class:`SegmentTally` keeps one
replica's part of a stream (first token, gaps, outcome). The two clients
keep only their blocking calls or awaits, so they cannot drift apart.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openai.types import CompletionUsage

from model_server.client.answer import StreamAssembly, needs_rich_assembly
from model_server.errors import (
    ClientError,
    GroupUnavailableError,
    InvalidRequestError,
    RequestRejectedError,
    StreamInterruptedError,
    UnknownGroupError,
)
from model_server.client.metrics import ClientMetrics
from model_server.config import ClientPolicy, Fleet, ServerKind, ServerSpec, load_fleet
from model_server.client.deadlines import estimate_tokens
from model_server.client.replica import EndpointSnapshot
from model_server.client.replica_group import Lease, ReplicaGroup
from model_server.client.request_plan import Call, CallResult, Done, Probe, RequestState, note_failure, request_plan
from model_server.client.retry import rejected_from
from model_server.client.resume import continuation_body, why_no_resume, why_not_resumable
from model_server.client.retry import Attempt, MalformedResponse, OutcomeKind, classify, describe
from model_server.client.runstate import mark_not_running
from model_server.client.wire import (
    CHAT_PARAMS,
    EMBED_PARAMS,
    DeadlineExceeded,
    ReplicaHTTPError,
    check_params,
    encode_body,
    error_message,
    normalize_embedding_input,
    sse_data,
)

__all__ = [
    "POOL_CONNECTIONS",
    "POOL_KEEPALIVE",
    "ChatRequest",
    "ClientCore",
    "EmbedRequest",
    "OpenedSegment",
    "SegmentOpening",
    "SegmentReading",
    "SegmentTally",
    "StreamResult",
    "parse_event",
]

log = logging.getLogger("model_server.client")

POOL_CONNECTIONS = 256  # per ModelServer: room for 64+ threads on several replicas
POOL_KEEPALIVE = 128
STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}


@dataclass
class ChatRequest:
    """A checked chat (or completions) request: the body every segment starts from, and what it allows."""

    call: str  # the public method, for messages: "chat", "stream_chat"
    kind: str  # "chat" or "completion"
    path: str  # under the replica's /v1
    body: dict[str, Any]  # without "model" (each replica has its own name)
    headers: dict[str, str]
    query: dict[str, Any]
    prompt_tokens: int  # an estimate, for the first-token deadline
    not_resumable: str | None  # why a broken stream of it is not resumed (None: it is)
    rich: bool  # several choices, tools or logprobs: assembled by the SDK's accumulator
    wire: bytes = b""  # ``body`` as JSON, encoded once at the edge

    def encoded(self, spec: ServerSpec, body: Mapping[str, Any] | None = None) -> bytes:
        """The bytes one replica is sent: the body (a continuation's, or the request's own) with its model name."""
        raw = self.wire if body is None or body is self.body else encode_body(body, self.call)
        return with_model(raw, spec.model_name)


@dataclass
class EmbedRequest:
    body: dict[str, Any]
    headers: dict[str, str]
    query: dict[str, Any]
    count: int
    single: bool
    prompt_tokens: int
    wire: bytes = b""  # ``body`` as JSON, encoded once at the edge

    def encoded(self, spec: ServerSpec) -> bytes:
        return with_model(self.wire, spec.model_name)


def with_model(body: bytes, model: str) -> bytes:
    """A JSON object's bytes with ``"model"`` first: each replica's name, without encoding the body again."""
    return b'{"model":' + json.dumps(model).encode() + (b"," + body[1:] if body != b"{}" else b"}")


def _split_extras(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """(body fields, extra headers, extra query) as the openai SDK spreads extra_body/headers/query."""
    body = {k: v for k, v in params.items() if k not in ("extra_body", "extra_headers", "extra_query")}
    body.update(params.get("extra_body") or {})
    body.pop("model", None)  # the client names each replica's model
    headers = {str(k): str(v) for k, v in (params.get("extra_headers") or {}).items()}
    return body, headers, dict(params.get("extra_query") or {})


def parse_event(data: str) -> Any:
    """One server-sent event's JSON; MalformedResponse if it is not JSON."""
    try:
        return json.loads(data)
    except ValueError as err:
        raise MalformedResponse(f"a stream event is not JSON: {data[:80]!r}") from err


class ClientCore:
    """What the sync and async clients share: the table, the groups, the policy, the decisions."""

    def __init__(
        self, config: str | os.PathLike[str] | Fleet | None, state_path: str | os.PathLike[str] | None,
        policy: ClientPolicy | None, metrics_registry: Any, clock: Callable[[], float], rng: random.Random | None,
    ) -> None:
        if config is None:
            from model_server.common.fleet_choice import default_fleet_path

            config = default_fleet_path()  # $MODEL_SERVER_CONFIG, servers.toml on its hosts, else (no GPU) local.toml
        self.fleet = config if isinstance(config, Fleet) else load_fleet(config)
        self.policy = policy or self.fleet.client
        state = state_path if state_path is not None else self.policy.run_state_file
        self.state_path = Path(state) if state is not None else None
        self.api_key = self.fleet.api_key()
        self.metrics = ClientMetrics(metrics_registry)
        self.clock = clock
        self.rng = rng or random.Random()
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
                specs = self.fleet.group(key)
                if not specs:
                    raise UnknownGroupError(key, self.group_names, self.fleet.source)
                group = self._groups[key] = ReplicaGroup(key, specs, self.policy, clock=self.clock)
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

    def probe_kwargs(self) -> dict[str, Any]:
        return {"api_key": self.api_key, "connect_timeout_s": self.policy.connect_timeout_s}

    def headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        headers.update(extra or {})
        return headers

    # ---- requests at the edge -------------------------------------------------------------

    def chat_request(self, call: str, messages: Any, params: dict[str, Any]) -> ChatRequest:
        """The checked request for chat()/stream_chat(): InvalidRequestError before any attempt."""
        check_params(params, CHAT_PARAMS, call)
        if not isinstance(messages, (list, tuple)) or not messages or not all(isinstance(m, Mapping) for m in messages):
            raise InvalidRequestError(
                f"{call}(): messages must be a non-empty list of dicts like {{'role': 'user', 'content': '...'}}, "
                f"got {type(messages).__name__}.",
                argument="messages",
            )
        body, headers, query = _split_extras(params)
        body["messages"] = [dict(m) for m in messages]
        body["stream"] = True
        body["stream_options"] = dict(STREAM_OPTIONS)
        return ChatRequest(
            call=call, kind="chat", path="/chat/completions", body=body, headers=headers, query=query,
            prompt_tokens=estimate_tokens(body["messages"]),
            not_resumable=why_not_resumable("chat", body, self.policy), rich=needs_rich_assembly(body),
            wire=encode_body(body, call),  # every problem of the caller's arguments shows here, before any attempt
        )

    def embed_request(self, inputs: Any, params: dict[str, Any]) -> EmbedRequest:
        check_params(params, EMBED_PARAMS, "embed")
        batch, single = normalize_embedding_input(inputs)
        body, headers, query = _split_extras(params)
        body.update(input=batch[0] if single and not isinstance(inputs, str) else batch, encoding_format="float")
        return EmbedRequest(body, headers, query, len(batch), single, estimate_tokens(batch), encode_body(body, "embed"))

    # ---- one call -------------------------------------------------------------------------

    def new_state(self) -> RequestState:
        return RequestState(self.policy, self.clock())

    def plan(self, group: ReplicaGroup, state: RequestState, hold_lease: bool = False, prompt_tokens: int = 0):
        return request_plan(
            group, self.policy, state, rng=self.rng, clock=self.clock, metrics=self.metrics, hold_lease=hold_lease,
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
                    name, attempts, f"no replica answered {self.policy.build_rounds} probe round(s) (client.build_rounds)"
                )

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
        self, group: ReplicaGroup, req: ChatRequest, state: RequestState, assembly: StreamAssembly, body: dict[str, Any],
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
                group.name, replica, received, tally.error, why_not_resumed="the replica refused to go on with it",
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
                log.warning("group '%s': %s broke mid-answer (%s) and %s: asking again from the start",
                            group.name, replica, tally.error, why)
                assembly.restart()
                return req.body
            raise StreamInterruptedError(
                group.name, replica, received, tally.error, why_not_resumed=why, resumes=state.resumes
            ) from err
        state.resumes += 1
        self.metrics.resume(group.name, replica)
        log.warning(
            "resuming a stream of group '%s': %s broke after %d token(s) (%s); continuing on another replica "
            "(resume %d/%d)", group.name, replica, assembly.tokens, tally.error, state.resumes, self.policy.max_resumes,
        )
        return continuation_body(req.kind, req.body, received, assembly.tokens)

    @staticmethod
    def after_refused(
        group: ReplicaGroup, req: ChatRequest, state: RequestState, assembly: StreamAssembly, err: ClientError,
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
            group.name, previous, assembly.text, str(state.last_error or "broken"),
            why_not_resumed=f"no replica could continue it ({err})", resumes=state.resumes,
        ) from err

    @staticmethod
    def ends_whole(assembly: StreamAssembly, err: BaseException) -> bool:
        """A stream that broke after its finish reason arrived (before [DONE]) is a whole answer."""
        return assembly.finished and classify(err) in (OutcomeKind.CONNECTION, OutcomeKind.TIMEOUT, OutcomeKind.MALFORMED)

    def note_resumed(self, group: ReplicaGroup, previous: str, lease: Lease, assembly: StreamAssembly) -> None:
        log.warning(
            "stream of group '%s' resumed on %s after %s broke (%d token(s) carried over)",
            group.name, lease.spec.name, previous, assembly.tokens_before,
        )


@dataclass
class OpenedSegment:
    """A replica's stream that has sent its first token (or ended without one); ``lines`` is its line iterator."""

    response: Any
    lines: Any
    first: str
    first_at: float
    stall_s: float
    ended: bool = False


_END = object()  # a line that ends the stream ([DONE])


class SegmentOpening:
    """The decisions while a segment waits for its first token, one line at a time (the drivers only read).

    :meth:`feed` returns None to read on, or the :class:`OpenedSegment`; :meth:`ended` decides a stream
    that closed first. A chunk without a token (role only, empty) does not count as the first token.
    """

    def __init__(self, core: ClientCore, call: Call, assembly: StreamAssembly, response: Any, lines: Any) -> None:
        self.core, self.call, self.assembly, self.response, self.lines = core, call, assembly, response, lines
        if not assembly.text:
            assembly.restart()  # an earlier attempt that failed before any text leaves nothing behind
        assembly.begin_segment()

    def _opened(self, first: str, ended: bool = False) -> OpenedSegment:
        lines = None if ended else self.lines
        return OpenedSegment(self.response, lines, first, self.core.clock(), self.call.deadlines.stall_s, ended)

    def feed(self, line: str) -> OpenedSegment | None:
        data = sse_data(line)
        if data is None:
            return None
        if data == "[DONE]":
            return self._opened("", ended=True)
        text = self.assembly.take(parse_event(data))
        if self.assembly.progressed:
            return self._opened(text)
        self.core.check_first_token(self.call)
        return None

    def ended(self) -> OpenedSegment:
        if self.assembly.finished:
            return self._opened("", ended=True)
        raise MalformedResponse("the stream ended before its first token and without [DONE]")


class SegmentReading:
    """The decisions while an opened segment streams, one line at a time.

    :meth:`feed` returns the caller's text (maybe empty) or ``None`` at the end; :attr:`stall` is the
    wait for the next token. It starts when the driver next reads, never while the caller holds the
    text it was given, and a chunk that carries no token does not restart it.
    """

    def __init__(self, core: ClientCore, tally: SegmentTally, assembly: StreamAssembly, stall_s: float) -> None:
        self.core, self.tally, self.assembly, self.stall_s = core, tally, assembly, stall_s
        self._stall: StallClock | None = None

    @property
    def stall(self) -> StallClock:
        if self._stall is None:
            self._stall = self.core.stall_clock(self.stall_s)
        return self._stall

    def feed(self, line: str) -> str | None:
        data = sse_data(line)
        if data is None:
            return ""
        if data == "[DONE]":
            return None
        self.assembly.progressed = False
        text = self.assembly.take(parse_event(data))
        if not self.assembly.progressed:
            self.stall.check(self.tally.lease.spec.name)
            return ""
        now = self.core.clock()
        self.tally.chunk(now, now - self.stall.since)
        self._stall = None  # the next wait starts when the driver reads again
        return text

    def ended(self) -> None:
        if not self.assembly.finished:
            raise MalformedResponse("the stream ended without [DONE]")


class StreamResult:
    """What a finished (or running) stream delivered: ``text``, ``usage``, ``resumes`` (ChatStream's and its twin's)."""

    _assembly: StreamAssembly
    _state: RequestState

    @property
    def text(self) -> str:
        return self._assembly.text

    @property
    def usage(self) -> CompletionUsage | None:
        usage = self._assembly.usage()
        return CompletionUsage(**usage) if usage is not None else None

    @property
    def resumes(self) -> int:
        return self._state.resumes


class StallClock:
    """The wait for a stream's next token: a socket deadline (monotonic) and a check on the client's clock."""

    def __init__(self, clock: Callable[[], float], stall_s: float) -> None:
        self.clock, self.stall_s = clock, stall_s
        self.since = clock()
        self.deadline = time.monotonic() + stall_s

    def left_s(self) -> float:
        return max(0.001, self.deadline - time.monotonic())

    def check(self, replica: str) -> None:
        if self.clock() - self.since > self.stall_s or time.monotonic() >= self.deadline:
            raise DeadlineExceeded("chunk after a stall", self.stall_s, replica)


@dataclass
class SegmentTally:
    """One replica's part of a stream, from its first text to its end: timing, outcome, the lease's release."""

    core: ClientCore
    group: ReplicaGroup
    lease: Lease
    stall_s: float
    first_at: float | None = None
    last_at: float | None = None
    chunks: int = 0
    waited_s: float = 0.0  # time spent waiting for tokens after the first (never the caller's time)
    outcome: OutcomeKind | None = None  # None until the end: a stream the caller dropped is a cancel
    error: str = ""
    error_obj: BaseException | None = field(default=None, repr=False)

    def started(self, now: float) -> None:
        self.first_at = self.last_at = now
        self.group.first_token(self.lease, now - self.lease.started_s)

    def chunk(self, now: float, waited_s: float) -> None:
        """A token arrived ``waited_s`` after this client began to wait for it (the caller's own time excluded)."""
        self.chunks += 1
        self.waited_s += waited_s
        self.last_at = now

    def ended(self) -> None:
        self.outcome = OutcomeKind.OK

    def broke(self, err: BaseException) -> BaseException | None:
        """Book a stream broken by ``err`` (the error to report); None if it is not the replica's doing (a bug)."""
        kind = classify(err)
        if kind is None:
            return None
        if kind is OutcomeKind.TIMEOUT and not isinstance(err, DeadlineExceeded):
            stalled = DeadlineExceeded("chunk after a stall", self.stall_s, self.lease.spec.name)
            stalled.__cause__ = err
            err = stalled
        if isinstance(err, DeadlineExceeded):
            self.core.metrics.stall(self.group.name, self.lease.spec.name, err.phase)
        self.outcome = kind  # REJECTED: the engine refused to go on (a 4xx error event), never charged
        self.error, self.error_obj = describe(err), err
        return err

    def receiving_s(self) -> float:
        return 0.0 if self.first_at is None or self.last_at is None else self.last_at - self.first_at

    def release(self, state: RequestState, tokens: int) -> bool:
        """Report the outcome (and book a break in the call's state); True if a background re-probe should start."""
        state.receiving_s += self.receiving_s()
        gap = self.waited_s / self.chunks if self.chunks else None  # the replica's pace, not the caller's
        if self.outcome is not None and self.outcome is not OutcomeKind.OK:
            elapsed = (self.last_at or self.core.clock()) - self.lease.started_s
            note_failure(self.group, state, self.lease, self.outcome, self.error, elapsed, self.core.metrics)
            state.last_error = self.error_obj
        reprobe = self.group.release(
            self.lease, self.outcome, error=self.error, output_tokens=max(1, tokens),
            gap_s=gap if self.outcome is OutcomeKind.OK else None,
        )
        return reprobe and not self.core.closed
