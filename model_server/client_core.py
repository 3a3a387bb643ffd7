"""What ModelServer and AsyncModelServer share: every decision that does not wait.

Nothing here waits on the network: :class:`ClientCore` resolves groups and
policies, builds each operation's SDK arguments, turns an attempt's exception
into its outcome, bounds a whole attempt, and marks the run-state file;
:class:`StreamTally` keeps a relayed stream's text, tokens and outcome; the
``*_answer`` functions turn an SDK answer into a value or a
:class:`~model_server.retry.MalformedResponse`. The two clients keep only
their blocking calls or awaits, so they cannot drift apart.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

from model_server.client_errors import (
    GroupUnavailableError,
    RequestRejectedError,
    StreamInterruptedError,
    UnknownGroupError,
)
from model_server.client_metrics import ClientMetrics
from model_server.config import ClientPolicy, Fleet, ServerKind, ServerSpec, load_fleet
from model_server.endpoint import EndpointSnapshot
from model_server.replica_group import Lease, ReplicaGroup
from model_server.request_plan import Call, CallResult, Done, Probe, request_plan
from model_server.retry import Attempt, MalformedResponse, OutcomeKind, classify, describe
from model_server.runstate import mark_not_running

__all__ = [
    "POOL_CONNECTIONS",
    "POOL_KEEPALIVE",
    "AttemptTimeout",
    "ClientCore",
    "StreamTally",
    "chat_answer",
    "chunk_text",
    "embedding_answer",
]

log = logging.getLogger("model_server.client")

POOL_CONNECTIONS = 256  # per ModelServer: room for 64+ threads on several replicas
POOL_KEEPALIVE = 128

RESERVED_CHAT_PARAMS = ("stream", "model", "timeout")  # the client chooses these


class AttemptTimeout(TimeoutError):
    """A whole attempt outlived its limit (the SDK's own timeouts are per read); classified as a timeout."""


class ClientCore:
    """What the sync and async clients share: the table, the groups, the policy, answers checking."""

    def __init__(
        self, config: str | os.PathLike[str] | Fleet | None, state_path: str | os.PathLike[str] | None,
        policy: ClientPolicy | None, metrics_registry: Any, clock: Callable[[], float], rng: random.Random | None,
    ) -> None:
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

    def plan(self, group: ReplicaGroup, hold_lease: bool = False):
        return request_plan(group, self.policy, rng=self.rng, clock=self.clock, metrics=self.metrics, hold_lease=hold_lease)

    def unavailable(self, group: ReplicaGroup) -> None:
        if self.state_path is not None:
            mark_not_running(self.state_path)
        log.error("group '%s' is unavailable: no replica answered within the retry budget", group.name)

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

    # ---- one attempt ----------------------------------------------------------------------

    def timeout(self, timeout_s: float) -> httpx.Timeout:
        return httpx.Timeout(timeout_s, connect=min(self.policy.connect_timeout_s, timeout_s))

    def attempt_limit_s(self, timeout_s: float) -> float:
        """A whole attempt's limit: its (per-read) timeout plus the connection's."""
        return timeout_s + self.policy.connect_timeout_s

    @staticmethod
    def check_chat_params(params: dict[str, Any]) -> None:
        """TypeError for parameters the client sets itself: checked at the call, before any attempt."""
        reserved = [k for k in RESERVED_CHAT_PARAMS if k in params]
        if reserved:
            raise TypeError(
                f"chat parameters may not set {', '.join(reserved)}: the client chooses stream, model and timeout "
                "(use stream_chat() to stream)"
            )

    def chat_kwargs(self, spec: ServerSpec, messages: Any, params: dict[str, Any], timeout_s: float, stream: bool) -> dict:
        kwargs = dict(params, model=spec.model_name, messages=messages, timeout=self.timeout(timeout_s))
        if stream:
            kwargs["stream"] = True
            kwargs.setdefault("stream_options", {"include_usage": True})
        return kwargs

    def embed_kwargs(self, spec: ServerSpec, batch: list[str], timeout_s: float) -> dict:
        return {"model": spec.model_name, "input": batch, "encoding_format": "float", "timeout": self.timeout(timeout_s)}

    def first_text(self, chunk: Any, call: Call) -> str:
        """A stream chunk's text before the first text arrived; AttemptTimeout once the attempt outlived its limit.

        A replica sending endless empty (or role-only) chunks never trips a per-read timeout: this does.
        """
        text, _ = chunk_text(chunk)
        limit_s = self.attempt_limit_s(call.timeout_s)
        if not text and self.clock() - call.lease.started_s > limit_s:
            raise AttemptTimeout(f"no text from {call.lease.spec.name} within {limit_s:.2f}s (whole attempt)")
        return text

    @staticmethod
    def failed(group: ReplicaGroup, call: Call, err: Exception) -> CallResult:
        """The outcome of an attempt that raised; an error that is not the replica's doing (a bug) is re-raised."""
        kind = classify(err)
        if kind is None:
            group.release(call.lease, None)
            raise err
        return CallResult(kind, error=err)

    def reprobe_after(self, done: Done) -> bool:
        """Whether the finished request asks for a background re-probe."""
        return done.reprobe and not self.closed

    def tally(self, group: ReplicaGroup, lease: Lease, first: str) -> StreamTally:
        return StreamTally(self, group, lease, first)


class StreamTally:
    """A relayed stream's bookkeeping: text received, output tokens, outcome; the lease's release at the end."""

    def __init__(self, core: ClientCore, group: ReplicaGroup, lease: Lease, first: str) -> None:
        self.core, self.group, self.lease = core, group, lease
        self.received = [first] if first else []
        self.tokens: int | None = None  # from the usage chunk, when the server sends one
        self.outcome: OutcomeKind | None = None  # None until the end: a stream dropped early is a cancel
        self.error = ""

    def take(self, chunk: Any) -> str:
        text, tokens = chunk_text(chunk)
        if tokens is not None:
            self.tokens = tokens
        if text:
            self.received.append(text)
        return text

    def ended(self) -> None:
        self.outcome = OutcomeKind.OK

    def interrupted(self, err: Exception) -> StreamInterruptedError | None:
        """The error to raise for a stream broken after its first chunk; None if ``err`` is not the replica's doing."""
        kind = classify(err)
        if kind is None:
            return None
        self.outcome, self.error = kind, describe(err)
        return StreamInterruptedError(self.group.name, self.lease.spec.name, "".join(self.received), self.error)

    def release(self) -> bool:
        """Report the outcome; True if a background re-probe should start."""
        count = self.tokens if self.tokens is not None else len(self.received)
        reprobe = self.group.release(self.lease, self.outcome, error=self.error, output_tokens=count)
        return reprobe and not self.core.closed


def chat_answer(response: Any) -> tuple[ChatCompletion, int | None]:
    """The completion and its output tokens, or MalformedResponse."""
    if not isinstance(response, ChatCompletion) or not response.choices or response.choices[0].message is None:
        raise MalformedResponse(f"not a chat completion: {str(response)[:120]!r}")
    tokens = response.usage.completion_tokens if response.usage is not None else None
    return response, tokens


def embedding_answer(response: Any, count: int) -> list[list[float]]:
    """The vectors in input order, or MalformedResponse."""
    if not isinstance(response, CreateEmbeddingResponse) or len(response.data) != count:
        raise MalformedResponse(f"not {count} embedding(s): {str(response)[:120]!r}")
    vectors = [d.embedding for d in sorted(response.data, key=lambda d: d.index)]
    if not all(isinstance(v, list) and v for v in vectors):
        raise MalformedResponse("an embedding is empty or not a list of floats")
    return vectors


def chunk_text(chunk: Any) -> tuple[str, int | None]:
    """(text, completion tokens if this chunk carries usage) of a stream chunk; MalformedResponse if it is not one."""
    choices = getattr(chunk, "choices", None)
    if choices is None:
        raise MalformedResponse(f"not a chat completion chunk: {str(chunk)[:120]!r}")
    usage = getattr(chunk, "usage", None)
    tokens = usage.completion_tokens if usage is not None else None
    text = "".join((c.delta.content or "") for c in choices if c.delta is not None)
    return text, tokens
