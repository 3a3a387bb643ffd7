"""AsyncModelServer: the asyncio twin of :class:`model_server.client.ModelServer`.

Same groups, policies, exceptions and retry plan (:mod:`model_server.request_plan`);
only the waiting differs: requests go through ``openai.AsyncOpenAI`` on one
shared ``httpx.AsyncClient``, probes run as concurrent tasks, and a re-probe
of a degraded group runs as a background task. The connection pool belongs to
the event loop that first used it: use one AsyncModelServer per loop, and
``await aclose()`` (or ``async with``) when done.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
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
from model_server.client_errors import GroupUnavailableError, StreamInterruptedError
from model_server.config import ClientPolicy, Fleet, ServerKind, ServerSpec
from model_server.endpoint import EndpointSnapshot
from model_server.probe import aprobe_group
from model_server.replica_group import Lease, ReplicaGroup
from model_server.request_plan import Call, CallResult, Done, Probe, Sleep
from model_server.retry import OutcomeKind, classify, describe

__all__ = ["AsyncModelServer"]

log = logging.getLogger("model_server.client")

AsyncOp = Callable[[openai.AsyncOpenAI, ServerSpec, float], Awaitable[tuple[Any, "int | None"]]]


class AsyncModelServer:
    """Async client of the fleet's groups: ``await chat(...)``, ``await embed(...)``, ``async for`` over ``stream_chat``."""

    def __init__(
        self, config: str | os.PathLike[str] | Fleet | None = None, *, state_path: str | os.PathLike[str] | None = None,
        policy: ClientPolicy | None = None, metrics_registry: Any = None,
        clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None,
    ) -> None:
        self._core = ClientCore(config, state_path, policy, metrics_registry, clock, rng)
        self.policy = self._core.policy
        self.fleet = self._core.fleet
        self._http: httpx.AsyncClient | None = None
        self._clients: dict[str, openai.AsyncOpenAI] = {}
        self._probe_locks: dict[str, asyncio.Lock] = {}
        self._reprobes: set[asyncio.Task] = set()
        self._closed = False

    # ---- public API ------------------------------------------------------------------------

    @property
    def groups(self) -> tuple[str, ...]:
        return self._core.group_names

    async def warmup(self, groups: Sequence[str] | None = None) -> dict[str, bool]:
        """Build every group (or those named) concurrently; raise GroupUnavailableError for a dead one."""
        names = [str(g) for g in (groups if groups is not None else self.groups)]
        built = {name: self._core.group(name) for name in names}
        found = dict(zip(built, await asyncio.gather(*(self._build(g) for g in built.values()))))
        self._core.raise_if_dead(built, found)
        return found

    async def chat(self, group: str | int, messages: list[dict[str, Any]], **params: Any) -> ChatCompletion:
        g = self._core.group(group, ServerKind.completion)

        async def op(client: openai.AsyncOpenAI, spec: ServerSpec, timeout_s: float) -> tuple[Any, int | None]:
            kwargs = self._core.chat_kwargs(spec, messages, params, timeout_s, stream=False)
            return chat_answer(await client.chat.completions.create(**kwargs))

        return (await self._drive(g, op)).value

    async def embed(self, group: str | int, inputs: str | list[str]) -> list[float] | list[list[float]]:
        g = self._core.group(group, ServerKind.embedding)
        batch = [inputs] if isinstance(inputs, str) else list(inputs)

        async def op(client: openai.AsyncOpenAI, spec: ServerSpec, timeout_s: float) -> tuple[Any, int | None]:
            response = await client.embeddings.create(
                model=spec.model_name, input=batch, encoding_format="float", timeout=self._core.timeout(timeout_s)
            )
            return embedding_answer(response, len(batch)), None

        vectors = (await self._drive(g, op)).value
        return vectors[0] if isinstance(inputs, str) else vectors

    async def get_completion_or_embedding(
        self, model_size: str | int, message: Any, temperature: float = 0.0, max_tokens: int = 256,
        get_embedding: bool = False,
    ) -> Any:
        if get_embedding:
            return await self.embed(model_size, message)
        reply = await self.chat(model_size, message, temperature=temperature, max_tokens=max_tokens)
        return reply.choices[0].message.content or ""

    def stream_chat(self, group: str | int, messages: list[dict[str, Any]], **params: Any) -> AsyncIterator[str]:
        """``async for`` over the text chunks; a wrong group is reported at the call."""
        g = self._core.group(group, ServerKind.completion)
        return self._stream(g, messages, params)

    async def _stream(self, g: ReplicaGroup, messages: list[dict[str, Any]], params: dict[str, Any]) -> AsyncIterator[str]:

        async def op(client: openai.AsyncOpenAI, spec: ServerSpec, timeout_s: float) -> tuple[Any, int | None]:
            stream = await client.chat.completions.create(**self._core.chat_kwargs(spec, messages, params, timeout_s, True))
            try:
                chunks = stream.__aiter__()
                async for chunk in chunks:
                    text, _ = chunk_text(chunk)
                    if text:
                        return (stream, chunks, text), None
                return (stream, None, ""), None
            except BaseException:
                await stream.close()
                raise

        done = await self._drive(g, op, hold_lease=True)
        stream, chunks, first = done.value
        async for piece in self._relay(g, done.lease, stream, chunks, first):
            yield piece

    def stats(self) -> dict[str, dict[str, EndpointSnapshot]]:
        return self._core.stats()

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Wait (bounded) for background re-probes, then close the connection pool."""
        self._closed = True
        if self._reprobes:
            await asyncio.wait(list(self._reprobes), timeout=timeout_s)
        if self._http is not None:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncModelServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---- the loop --------------------------------------------------------------------------

    async def _relay(self, g: ReplicaGroup, lease: Lease, stream: Any, chunks: Any, first: str) -> AsyncIterator[str]:
        received = [first]
        tokens: int | None = None
        outcome: OutcomeKind | None = None
        error = ""
        try:
            if first:
                yield first
            if chunks is not None:
                async for chunk in chunks:
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
            count = tokens if tokens is not None else sum(1 for r in received if r)
            if g.release(lease, outcome, error=error, output_tokens=count) and not self._closed:
                self._start_reprobe(g)
            await stream.close()

    def _pool(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=POOL_CONNECTIONS, max_keepalive_connections=POOL_KEEPALIVE),
                timeout=httpx.Timeout(self.policy.request_timeout_ceiling_s, connect=self.policy.connect_timeout_s),
            )
        return self._http

    def _openai(self, spec: ServerSpec) -> openai.AsyncOpenAI:
        client = self._clients.get(spec.name)
        if client is None:
            client = self._clients[spec.name] = openai.AsyncOpenAI(
                base_url=spec.base_url, api_key=self._core.api_key or "EMPTY", max_retries=0, http_client=self._pool(),
            )
        return client

    async def _drive(self, g: ReplicaGroup, op: AsyncOp, hold_lease: bool = False) -> Done:
        plan = self._core.plan(g, hold_lease)
        try:
            action = next(plan)
            while True:
                if isinstance(action, Call):
                    result: Any = await self._perform(g, op, action)
                elif isinstance(action, Sleep):
                    await asyncio.sleep(action.delay_s)
                    result = None
                elif isinstance(action, Probe):
                    result = await self._probe_round(g, action.seen_rounds)
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

    async def _perform(self, g: ReplicaGroup, op: AsyncOp, call: Call) -> CallResult:
        spec = call.lease.spec
        try:
            # The SDK's timeouts are per read; wait_for bounds the whole attempt as well.
            value, tokens = await asyncio.wait_for(
                op(self._openai(spec), spec, call.timeout_s), timeout=call.timeout_s + self.policy.connect_timeout_s
            )
        except Exception as err:
            kind = classify(err)
            if kind is None:
                g.release(call.lease, None)
                raise
            return CallResult(kind, error=err)
        except BaseException:  # cancelled
            g.release(call.lease, None)
            raise
        return CallResult(OutcomeKind.OK, value, output_tokens=tokens)

    async def _build(self, g: ReplicaGroup) -> bool:
        for _ in range(self.policy.build_rounds):
            if await self._probe_round(g, g.probe_rounds):
                return True
        return False

    async def _probe_round(self, g: ReplicaGroup, seen_rounds: int) -> bool:
        lock = self._probe_locks.setdefault(g.name, asyncio.Lock())
        async with lock:
            if g.probe_rounds > seen_rounds:
                return g.last_round_found
            results = await aprobe_group(
                g.specs, g.probe_timeout_s(), api_key=self._core.api_key, client=self._pool(),
                connect_timeout_s=self.policy.connect_timeout_s,
            )
            return g.apply_probes(results)

    def _start_reprobe(self, g: ReplicaGroup) -> None:
        if not g.try_start_reprobe():
            return

        async def run() -> None:
            try:
                await self._probe_round(g, g.probe_rounds)
            except Exception:
                log.exception("background re-probe of group '%s' failed", g.name)
            finally:
                g.end_reprobe()

        task = asyncio.get_running_loop().create_task(run(), name=f"model-server-reprobe-{g.name}")
        self._reprobes.add(task)
        task.add_done_callback(self._reprobes.discard)
