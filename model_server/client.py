"""ModelServer: send completions and embeddings to a group's healthy replicas.

Application code names a *group* of the fleet table ("8" for the 8B chat
replicas, "7" for embeddings, ...); the client picks a replica by the routing
policy, times the request out from the group's latency bound, fails over to
the next replica on a connection error, timeout, 5xx, 429 or malformed answer
(with jittered backoff, inside one retry budget per request), keeps a circuit
breaker per replica and re-probes a group whose replica got much slower. One
``ModelServer`` is meant to be shared by every thread of a process.

Exceptions (all under :class:`model_server.errors.ModelServerError`)::

    ClientError                      anything the client raises on purpose
    ├── UnknownGroupError            no such group in the table (also a KeyError); lists the groups
    ├── RequestRejectedError         the server says the request is wrong (400/404/413/422, 401/403):
    │                                never retried, never held against a replica; .status, .body
    ├── GroupUnavailableError        the budget is spent and no replica answered;
    │                                .attempts = ((replica, error, elapsed_s), ...)
    └── StreamInterruptedError       a stream broke after its first chunk; .text = what arrived

:class:`AsyncModelServer` (in :mod:`model_server.async_client`) has the same
methods for asyncio code. The retry loop itself is :mod:`model_server.request_plan`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import httpx
import openai
from openai.types.chat import ChatCompletion

from model_server.client_core import (
    POOL_CONNECTIONS,
    POOL_KEEPALIVE,
    ClientCore,
    chat_answer,
    chunk_text,
    embedding_answer,
)
from model_server.client_errors import (
    GroupUnavailableError,
    RequestRejectedError,
    StreamInterruptedError,
    UnknownGroupError,
)
from model_server.config import ClientPolicy, Fleet, ServerKind, ServerSpec
from model_server.endpoint import EndpointSnapshot
from model_server.errors import ClientError
from model_server.probe import probe_group
from model_server.replica_group import Lease, ReplicaGroup
from model_server.request_plan import Call, CallResult, Done, Probe, Sleep
from model_server.retry import OutcomeKind, classify, describe

__all__ = [
    "AsyncModelServer",
    "ClientError",
    "GroupUnavailableError",
    "ModelServer",
    "RequestRejectedError",
    "StreamInterruptedError",
    "UnknownGroupError",
]

log = logging.getLogger(__name__)

class ModelServer:
    """A thread-safe client of the fleet's groups, with failover, breakers and re-probes.

    ``config``: a fleet table path or a :class:`Fleet`; default ``$MODEL_SERVER_CONFIG``,
    else ``configs/servers.toml``. ``state_path`` overrides ``client.run_state_file``;
    ``policy`` overrides the table's ``[client]`` section; ``metrics_registry`` turns on
    Prometheus metrics (see :mod:`model_server.client_metrics`).
    """

    def __init__(
        self, config: str | os.PathLike[str] | Fleet | None = None, *, state_path: str | os.PathLike[str] | None = None,
        policy: ClientPolicy | None = None, metrics_registry: Any = None,
        clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None,
    ) -> None:
        self._core = ClientCore(config, state_path, policy, metrics_registry, clock, rng)
        self.policy = self._core.policy
        self.fleet = self._core.fleet
        self._http = httpx.Client(
            limits=httpx.Limits(max_connections=POOL_CONNECTIONS, max_keepalive_connections=POOL_KEEPALIVE),
            timeout=httpx.Timeout(self.policy.request_timeout_ceiling_s, connect=self.policy.connect_timeout_s),
        )
        self._clients: dict[str, openai.OpenAI] = {}
        self._clients_lock = threading.Lock()
        self._probe_locks = {g: threading.Lock() for g in self.fleet.groups}
        self._reprobes: set[threading.Thread] = set()
        self._closed = False

    # ---- public API ------------------------------------------------------------------------

    @property
    def groups(self) -> tuple[str, ...]:
        return self._core.group_names

    def warmup(self, groups: Sequence[str] | None = None) -> dict[str, bool]:
        """Build every group (or those named) now, concurrently; raise GroupUnavailableError for a dead one."""
        names = [str(g) for g in (groups if groups is not None else self.groups)]
        built = {name: self._core.group(name) for name in names}
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(built))) as pool:
            found = dict(zip(built, pool.map(self._build, built.values())))
        self._core.raise_if_dead(built, found)
        return found

    def chat(self, group: str | int, messages: list[dict[str, Any]], **params: Any) -> ChatCompletion:
        """An openai ChatCompletion from the group's best replica (``params`` as for the openai SDK)."""
        g = self._core.group(group, ServerKind.completion)

        def op(client: openai.OpenAI, spec: ServerSpec, timeout_s: float) -> tuple[Any, int | None]:
            kwargs = self._core.chat_kwargs(spec, messages, params, timeout_s, stream=False)
            return chat_answer(client.chat.completions.create(**kwargs))

        return self._drive(g, op).value

    def embed(self, group: str | int, inputs: str | list[str]) -> list[float] | list[list[float]]:
        """One vector for a string, a list of vectors for a list of strings."""
        g = self._core.group(group, ServerKind.embedding)
        batch = [inputs] if isinstance(inputs, str) else list(inputs)

        def op(client: openai.OpenAI, spec: ServerSpec, timeout_s: float) -> tuple[Any, int | None]:
            response = client.embeddings.create(
                model=spec.model_name, input=batch, encoding_format="float", timeout=self._core.timeout(timeout_s)
            )
            return embedding_answer(response, len(batch)), None

        vectors = self._drive(g, op).value
        return vectors[0] if isinstance(inputs, str) else vectors

    def get_completion_or_embedding(
        self, model_size: str | int, message: Any, temperature: float = 0.0, max_tokens: int = 256,
        get_embedding: bool = False,
    ) -> Any:
        """The original call shape: chat messages -> reply text; a string with get_embedding=True -> a vector."""
        if get_embedding:
            return self.embed(model_size, message)
        reply = self.chat(model_size, message, temperature=temperature, max_tokens=max_tokens)
        return reply.choices[0].message.content or ""

    def stream_chat(self, group: str | int, messages: list[dict[str, Any]], **params: Any) -> Iterator[str]:
        """Text chunks of a streamed reply; failover is invisible before the first chunk.

        A wrong group is reported here, at the call; the request is sent on the first ``next()``.
        """
        g = self._core.group(group, ServerKind.completion)
        return self._stream(g, messages, params)

    def _stream(self, g: ReplicaGroup, messages: list[dict[str, Any]], params: dict[str, Any]) -> Iterator[str]:

        def op(client: openai.OpenAI, spec: ServerSpec, timeout_s: float) -> tuple[Any, int | None]:
            stream = client.chat.completions.create(**self._core.chat_kwargs(spec, messages, params, timeout_s, True))
            try:
                chunks = iter(stream)
                for chunk in chunks:  # up to the first chunk with text: until then, failing over is free
                    text, _ = chunk_text(chunk)
                    if text:
                        return (stream, chunks, text), None
                return (stream, iter(()), ""), None
            except BaseException:
                stream.close()
                raise

        done = self._drive(g, op, hold_lease=True)
        stream, chunks, first = done.value
        yield from self._relay(g, done.lease, stream, chunks, first)

    def stats(self) -> dict[str, dict[str, EndpointSnapshot]]:
        """Each built group's replicas: breaker, latency, in flight, attempts, failures."""
        return self._core.stats()

    def close(self, timeout_s: float = 5.0) -> None:
        """Wait (bounded) for background re-probes, then close the connection pool."""
        self._closed = True
        deadline = time.monotonic() + timeout_s
        for thread in list(self._reprobes):
            thread.join(max(0.0, deadline - time.monotonic()))
        self._http.close()

    def __enter__(self) -> ModelServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the loop --------------------------------------------------------------------------

    def _relay(self, g: ReplicaGroup, lease: Lease, stream: Any, chunks: Iterator[Any], first: str) -> Iterator[str]:
        received = [first]
        tokens: int | None = None
        outcome: OutcomeKind | None = None
        error = ""
        try:
            if first:
                yield first
            for chunk in chunks:
                text, usage_tokens = chunk_text(chunk)
                tokens = usage_tokens if usage_tokens is not None else tokens
                if text:
                    received.append(text)
                    yield text
            outcome = OutcomeKind.OK
        except Exception as err:
            kind = classify(err)
            if kind is None:
                raise
            outcome, error = kind, describe(err)
            raise StreamInterruptedError(g.name, lease.spec.name, "".join(received), error) from err
        finally:
            stream.close()
            count = tokens if tokens is not None else sum(1 for r in received if r)
            if g.release(lease, outcome, error=error, output_tokens=count) and not self._closed:
                self._start_reprobe(g)

    def _openai(self, spec: ServerSpec) -> openai.OpenAI:
        with self._clients_lock:
            client = self._clients.get(spec.name)
            if client is None:
                client = self._clients[spec.name] = openai.OpenAI(
                    base_url=spec.base_url, api_key=self._core.api_key or "EMPTY", max_retries=0, http_client=self._http,
                )
            return client

    def _drive(self, g: ReplicaGroup, op: Callable[..., tuple[Any, int | None]], hold_lease: bool = False) -> Done:
        plan = self._core.plan(g, hold_lease)
        try:
            action = next(plan)
            while True:
                if isinstance(action, Call):
                    result: Any = self._perform(g, op, action)
                elif isinstance(action, Sleep):
                    time.sleep(action.delay_s)
                    result = None
                elif isinstance(action, Probe):
                    result = self._probe_round(g, action.seen_rounds)
                else:  # pragma: no cover
                    raise AssertionError(f"unknown action {action!r}")
                action = plan.send(result)
        except StopIteration as stop:
            done: Done = stop.value
            if done.reprobe and not self._closed:
                self._start_reprobe(g)
            return done
        except GroupUnavailableError:
            self._core.unavailable(g)
            raise

    def _perform(self, g: ReplicaGroup, op: Callable[..., tuple[Any, int | None]], call: Call) -> CallResult:
        spec = call.lease.spec
        try:
            value, tokens = op(self._openai(spec), spec, call.timeout_s)
        except Exception as err:
            kind = classify(err)
            if kind is None:  # not the replica's doing: a bug or a bad argument
                g.release(call.lease, None)
                raise
            return CallResult(kind, error=err)
        except BaseException:
            g.release(call.lease, None)
            raise
        return CallResult(OutcomeKind.OK, value, output_tokens=tokens)

    def _build(self, g: ReplicaGroup) -> bool:
        for _ in range(self.policy.build_rounds):
            if self._probe_round(g, g.probe_rounds):
                return True
        return False

    def _probe_round(self, g: ReplicaGroup, seen_rounds: int) -> bool:
        """One probe round of the group; threads arriving meanwhile wait for it instead of probing again."""
        lock = self._probe_locks[g.name]
        wait_s = g.probe_timeout_s() + self.policy.connect_timeout_s + 2.0
        if not lock.acquire(timeout=wait_s):
            return False
        try:
            if g.probe_rounds > seen_rounds:
                return g.last_round_found
            results = probe_group(
                g.specs, g.probe_timeout_s(), api_key=self._core.api_key, client=self._http,
                connect_timeout_s=self.policy.connect_timeout_s,
            )
            return g.apply_probes(results)
        finally:
            lock.release()

    def _start_reprobe(self, g: ReplicaGroup) -> None:
        if not g.try_start_reprobe():
            return

        def run() -> None:
            try:
                self._probe_round(g, g.probe_rounds)
            except Exception:  # never let a background probe kill anything
                log.exception("background re-probe of group '%s' failed", g.name)
            finally:
                g.end_reprobe()
                self._reprobes.discard(threading.current_thread())

        thread = threading.Thread(target=run, name=f"model-server-reprobe-{g.name}", daemon=True)
        self._reprobes.add(thread)
        thread.start()


def __getattr__(name: str) -> Any:
    if name == "AsyncModelServer":  # defined in its own module, re-exported here
        from model_server.async_client import AsyncModelServer

        return AsyncModelServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
