"""AsyncModelServer: the asyncio twin of :class:`model_server.client.ModelServer`.

Same groups, policies, exceptions, retry plan, deadlines and resumes: every
decision is in :class:`~model_server.client.base.ClientBase`; this driver only
performs its effects with awaits. Requests go through one shared
``httpx.AsyncClient``, each read is bounded by the attempt's deadline in the
caller's own task (:func:`model_server.common.aio.timeout_after`), probes run
as concurrent tasks, and a re-probe runs as a background task. The connection
pool belongs to the event loop that first used it: use one AsyncModelServer
per loop, and ``await aclose()`` (or ``async with``) when done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import httpx

from model_server.client import effects as fx
from model_server.client.base import ClientBase
from model_server.client.core import POOL_CONNECTIONS, POOL_KEEPALIVE
from model_server.client.probe import aprobe_group
from model_server.client.replica_group import ReplicaGroup
from model_server.client.segments import StreamResult
from model_server.common.aio import timeout_after

__all__ = ["AsyncChatStream", "AsyncModelServer"]

log = logging.getLogger("model_server.client")


class AsyncChatStream(StreamResult):
    """``async for`` over the text of a streamed chat answer; ``text``, ``usage``, ``resumes`` as ChatStream."""

    def __aiter__(self) -> AsyncChatStream:
        return self

    async def __anext__(self) -> str:
        return await self._pieces.__anext__()

    async def aclose(self) -> None:
        aclose = getattr(self._pieces, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> AsyncChatStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncModelServer(ClientBase):
    """Async client of the fleet's groups: ``await chat(...)``, ``await embed(...)``, ``async for`` over a stream.

    The arguments are :class:`~model_server.client.base.ClientBase`'s; ``sleep`` is a coroutine function,
    ``transport`` an ``httpx.AsyncBaseTransport`` and ``prober`` a coroutine function shaped as ``aprobe_group``.
    """

    _stream_type = AsyncChatStream

    _default_sleep = staticmethod(asyncio.sleep)
    _default_prober = staticmethod(aprobe_group)

    def _connect(self, transport: httpx.AsyncBaseTransport | None) -> None:
        self._transport = transport
        self._http: httpx.AsyncClient | None = None  # made in the event loop that first uses it
        self._probe_locks: dict[str, asyncio.Lock] = {}
        self._reprobes: set[asyncio.Task] = set()  # one event loop: no lock needed

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Wait (bounded) for background re-probes, then close the connection pool."""
        self._core.closed = True
        self._stop_listening()
        if self._reprobes:
            await asyncio.wait(list(self._reprobes), timeout=timeout_s)
        if self._http is not None:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncModelServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---- running flows -------------------------------------------------------------------------

    async def _finish(self, flow: fx.Flow) -> Any:
        run = fx.FlowRun(flow)
        async for _ in self._steps(run):
            pass
        return run.value

    def _stream(self, flow: fx.Flow) -> AsyncIterator[str]:
        return self._steps(fx.FlowRun(flow))

    async def _steps(self, run: fx.FlowRun) -> AsyncIterator[str]:
        """Await the flow's effects in this task; yield the text it gives the caller."""
        try:
            for effect in run:
                if type(effect) is fx.Emit:
                    yield effect.text
                else:
                    await run.asettle(self._effects[type(effect)], self, effect)
        finally:
            for stream in run.close():
                with contextlib.suppress(Exception):  # one that fails to close must not keep the others open
                    await stream.response.aclose()
            run.raise_cleanup_error()

    def _start_reprobe(self, g: ReplicaGroup) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a stream closed by the garbage collector, outside any loop: no re-probe now
            return
        if self._core.closed or not g.try_start_reprobe():
            return
        task = loop.create_task(self._finish(self._reprobe(g)), name=f"model-server-reprobe-{g.name}")
        self._reprobes.add(task)
        task.add_done_callback(self._reprobes.discard)

    def _pool(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=POOL_CONNECTIONS, max_keepalive_connections=POOL_KEEPALIVE),
                timeout=httpx.Timeout(self.policy.request_timeout_ceiling_s, connect=self.policy.connect_timeout_s),
                trust_env=False,
                transport=self._transport,
            )
        return self._http

    # ---- effects, awaited -----------------------------------------------------------------------

    @staticmethod
    async def _within(deadline: fx.Deadline, read: Awaitable[Any]) -> Any:
        """``await read`` in this task until the deadline; DeadlineExceeded once it has passed."""
        try:
            async with timeout_after(deadline.left_s()):
                return await read
        except TimeoutError as err:
            raise deadline.exceeded() from err

    async def _send(self, effect: fx.Send) -> fx.OpenStream:
        client = self._pool()
        request = client.build_request(
            "POST", effect.url, content=effect.content, headers=dict(effect.headers), params=effect.query or None
        )
        response = await self._within(effect.deadline, client.send(request, stream=True))
        return fx.OpenStream(response, response.aiter_lines(), response.status_code)

    async def _read(self, effect: fx.Read) -> str | bytes | None:
        read = effect.stream.response.aread() if effect.whole else anext(effect.stream.lines, None)
        return await self._within(effect.deadline, read)

    async def _close(self, effect: fx.Close) -> None:
        await effect.stream.response.aclose()

    async def _pause(self, effect: fx.Sleep) -> None:
        await self._sleep(effect.delay_s)

    async def _lock_probes(self, effect: fx.LockProbes) -> asyncio.Lock | None:
        lock = self._probe_locks.setdefault(effect.group, asyncio.Lock())
        try:
            await asyncio.wait_for(lock.acquire(), timeout=effect.wait_s)
        except asyncio.TimeoutError:
            return None
        return lock

    async def _probe_replicas(self, effect: fx.ProbeReplicas) -> Any:
        return await self._prober(
            effect.specs,
            effect.timeout_s,
            client=self._pool(),
            suspects=effect.suspects,
            patient=effect.patient,
            api_key=effect.api_key,
            connect_timeout_s=effect.connect_timeout_s,
        )

    async def _concurrently(self, effect: fx.Concurrently) -> dict[str, Any]:
        return dict(zip(effect.flows, await asyncio.gather(*(self._finish(f) for f in effect.flows.values()))))
