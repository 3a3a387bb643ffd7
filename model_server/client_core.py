"""What ModelServer and AsyncModelServer share: the table, the groups, answer checks.

Nothing here waits on the network: :class:`ClientCore` resolves groups and
policies and marks the run-state file; the ``*_answer`` functions turn an SDK
answer into a value or a :class:`~model_server.retry.MalformedResponse`.
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

from model_server.client_errors import GroupUnavailableError, RequestRejectedError, UnknownGroupError
from model_server.client_metrics import ClientMetrics
from model_server.config import ClientPolicy, Fleet, ServerKind, ServerSpec, load_fleet
from model_server.endpoint import EndpointSnapshot
from model_server.replica_group import ReplicaGroup
from model_server.request_plan import request_plan
from model_server.retry import Attempt, MalformedResponse
from model_server.runstate import mark_not_running

__all__ = ["POOL_CONNECTIONS", "POOL_KEEPALIVE", "ClientCore", "chat_answer", "chunk_text", "embedding_answer"]

log = logging.getLogger("model_server.client")

POOL_CONNECTIONS = 256  # per ModelServer: room for 64+ threads on several replicas
POOL_KEEPALIVE = 128


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

    def timeout(self, timeout_s: float) -> httpx.Timeout:
        return httpx.Timeout(timeout_s, connect=min(self.policy.connect_timeout_s, timeout_s))

    def chat_kwargs(self, spec: ServerSpec, messages: Any, params: dict[str, Any], timeout_s: float, stream: bool) -> dict:
        if "stream" in params or "model" in params or "timeout" in params:
            raise TypeError("chat parameters may not set stream, model or timeout: the client chooses them")
        kwargs = dict(params, model=spec.model_name, messages=messages, timeout=self.timeout(timeout_s))
        if stream:
            kwargs["stream"] = True
            kwargs.setdefault("stream_options", {"include_usage": True})
        return kwargs


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
