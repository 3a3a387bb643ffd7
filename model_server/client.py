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
from model_server.retry import OutcomeKind

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

SyncOp = Callable[[openai.OpenAI, Call], tuple[Any, "int | None"]]


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
        self._reprobes: set[threading.Thread] = set()  # background re-probes, guarded by _reprobes_lock
        self._reprobes_lock = threading.Lock()

    # ---- public API ------------------------------------------------------------------------

    @property
    def groups(self) -> tuple[str, ...]:
        return self._core.group_names

    def warmup(self, groups: Sequence[str] | None = None) -> dict[str, bool]:
        """Build every group (or those named) now, concurrently; raise GroupUnavailableError for a dead one."""
        built = self._core.warmup_groups(groups)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(built))) as pool:
            found = dict(zip(built, pool.map(self._build, built.values())))
        self._core.raise_if_dead(built, found)
        return found

    def chat(self, group: str | int, messages: list[dict[str, Any]], **params: Any) -> ChatCompletion:
        """An openai ChatCompletion from the group's best replica (``params`` as for the openai SDK)."""
        self._core.check_chat_params(params)
        g = self._core.group(group, ServerKind.completion)

        def op(client: openai.OpenAI, call: Call) -> tuple[Any, int | None]:
            kwargs = self._core.chat_kwargs(call.lease.spec, messages, params, call.timeout_s, stream=False)
            return chat_answer(client.chat.completions.create(**kwargs))

        return self._drive(g, op).value

    def embed(self, group: str | int, inputs: str | list[str]) -> list[float] | list[list[float]]:
        """One vector for a string, a list of vectors for a list of strings."""
        g = self._core.group(group, ServerKind.embedding)
        batch = [inputs] if isinstance(inputs, str) else list(inputs)

        def op(client: openai.OpenAI, call: Call) -> tuple[Any, int | None]:
            response = client.embeddings.create(**self._core.embed_kwargs(call.lease.spec, batch, call.timeout_s))
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

        A wrong group or parameter is reported here, at the call; the request is sent on the first ``next()``.
        """
        self._core.check_chat_params(params)
        g = self._core.group(group, ServerKind.completion)
        return self._stream(g, messages, params)

    def _stream(self, g: ReplicaGroup, messages: list[dict[str, Any]], params: dict[str, Any]) -> Iterator[str]:

        def op(client: openai.OpenAI, call: Call) -> tuple[Any, int | None]:
            kwargs = self._core.chat_kwargs(call.lease.spec, messages, params, call.timeout_s, stream=True)
            stream = client.chat.completions.create(**kwargs)
            try:
                chunks = iter(stream)
                for chunk in chunks:  # up to the first chunk with text: until then, failing over is free
                    text = self._core.first_text(chunk, call)
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
        deadline = time.monotonic() + timeout_s
        with self._reprobes_lock:  # with _start_reprobe's check: no re-probe starts after this
            self._core.closed = True
            running = list(self._reprobes)
        for thread in running:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._http.close()

    def __enter__(self) -> ModelServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the loop: each decision is in ClientCore or the plan; only the blocking calls are here ----

    def _relay(self, g: ReplicaGroup, lease: Lease, stream: Any, chunks: Iterator[Any], first: str) -> Iterator[str]:
        tally = self._core.tally(g, lease, first)
        try:
            if first:
                yield first
            for chunk in chunks:
                text = tally.take(chunk)
                if text:
                    yield text
            tally.ended()
        except Exception as err:
            interrupted = tally.interrupted(err)
            if interrupted is None:
                raise
            raise interrupted from err
        finally:
            try:
                stream.close()
            finally:
                if tally.release():
                    self._start_reprobe(g)

    def _openai(self, spec: ServerSpec) -> openai.OpenAI:
        with self._clients_lock:
            client = self._clients.get(spec.name)
            if client is None:
                client = self._clients[spec.name] = openai.OpenAI(
                    base_url=spec.base_url, api_key=self._core.api_key or "EMPTY", max_retries=0, http_client=self._http,
                )
            return client

    def _drive(self, g: ReplicaGroup, op: SyncOp, hold_lease: bool = False) -> Done:
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
                    result = self._probe_round(g, action)
                else:  # pragma: no cover
                    raise AssertionError(f"unknown action {action!r}")
                action = plan.send(result)
        except StopIteration as stop:
            done: Done = stop.value
            if self._core.reprobe_after(done):
                self._start_reprobe(g)
            return done
        except GroupUnavailableError:
            self._core.unavailable(g)
            raise

    def _perform(self, g: ReplicaGroup, op: SyncOp, call: Call) -> CallResult:
        try:
            value, tokens = op(self._openai(call.lease.spec), call)
        except Exception as err:
            return self._core.failed(g, call, err)
        except BaseException:
            g.release(call.lease, None)
            raise
        return CallResult(OutcomeKind.OK, value, output_tokens=tokens)

    def _build(self, g: ReplicaGroup) -> bool:
        for _ in range(self.policy.build_rounds):
            if self._probe_round(g, self._core.fresh_probe(g)):
                return True
        return False

    def _probe_round(self, g: ReplicaGroup, probe: Probe) -> bool:
        """One probe round of the group; threads arriving meanwhile wait for it instead of probing again."""
        lock = self._probe_locks[g.name]
        if not lock.acquire(timeout=probe.wait_s):
            return False
        try:
            joined = self._core.joined_round(g, probe)
            if joined is not None:
                return joined
            results = probe_group(g.specs, probe.timeout_s, client=self._http, **self._core.probe_kwargs())
            return g.apply_probes(results, probe.timeout_s)
        finally:
            lock.release()

    def _start_reprobe(self, g: ReplicaGroup) -> None:
        def run() -> None:
            try:
                self._probe_round(g, self._core.fresh_probe(g))
            except Exception:  # never let a background probe kill anything
                log.exception("background re-probe of group '%s' failed", g.name)
            finally:
                g.end_reprobe()
                with self._reprobes_lock:
                    self._reprobes.discard(threading.current_thread())

        with self._reprobes_lock:  # closed is checked, and the thread started, under close()'s lock
            if self._core.closed or not g.try_start_reprobe():
                return
            thread = threading.Thread(target=run, name=f"model-server-reprobe-{g.name}", daemon=True)
            self._reprobes.add(thread)
            thread.start()


def __getattr__(name: str) -> Any:
    if name == "AsyncModelServer":  # defined in its own module, re-exported here
        from model_server.async_client import AsyncModelServer

        return AsyncModelServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
