"""ModelServer: send completions and embeddings to a group's healthy replicas, from threads.

Application code names a *group* of the fleet table ("8" for the 8B chat
replicas, "7" for embeddings, ...); the client picks a replica by the routing
policy, holds every attempt to a first-token deadline and a stall deadline
(:mod:`model_server.client.deadlines`), fails over to the next replica on a
connection error, a missed deadline, a 5xx, 429 or malformed answer (with
jittered backoff, inside one budget per call: :mod:`model_server.client.request_plan`),
keeps a circuit breaker per replica, re-probes replicas that are degraded or
out of rotation, and resumes a stream that breaks after text arrived on
another replica (:mod:`model_server.client.resume`). A chat answer is streamed
under the hood even when the caller wants it whole, so that the same deadlines
and resumes protect it. One ``ModelServer`` is meant to be shared by every
thread of a process. The exceptions are drawn in :mod:`model_server.errors`.

Every decision is in :class:`~model_server.client.base.ClientBase`; this
driver only performs its effects with blocking calls: one shared
``httpx.Client`` whose socket reads obey the attempt's deadline
(:mod:`model_server.client.deadline_transport`), threads for probe rounds and
re-probes, ``time.sleep`` for backoffs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from model_server.client import effects as fx
from model_server.client.base import ClientBase
from model_server.client.core import POOL_CONNECTIONS, POOL_KEEPALIVE
from model_server.client.deadline_transport import deadline_transport, set_deadline
from model_server.client.probe import probe_group
from model_server.client.replica_group import ReplicaGroup
from model_server.client.segments import StreamResult

__all__ = ["ChatStream", "ModelServer"]

log = logging.getLogger("model_server.client")


class ChatStream(StreamResult):
    """The text of a streamed chat answer, chunk by chunk (an iterator of str).

    After the iteration: ``text`` (the whole answer), ``usage`` (prompt tokens once, completion
    tokens of every segment summed; None if the server sent none), ``resumes`` (how often the
    stream continued on another replica). ``close()`` (or leaving a ``with`` block) frees the
    replica at once when the caller stops early.
    """

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ModelServer(ClientBase):
    """A thread-safe client of the fleet's groups, with deadlines, failover, resumes, breakers and re-probes.

    The arguments are :class:`~model_server.client.base.ClientBase`'s; ``sleep`` blocks, ``transport``
    is an ``httpx.BaseTransport`` and ``prober`` is :func:`~model_server.client.probe.probe_group`'s shape.
    """

    _stream_type = ChatStream

    _default_sleep = staticmethod(time.sleep)
    _default_prober = staticmethod(probe_group)

    def _connect(self, transport: httpx.BaseTransport | None) -> None:
        limits = httpx.Limits(max_connections=POOL_CONNECTIONS, max_keepalive_connections=POOL_KEEPALIVE)
        self._http = httpx.Client(
            transport=transport or deadline_transport(limits),
            timeout=httpx.Timeout(self.policy.request_timeout_ceiling_s, connect=self.policy.connect_timeout_s),
        )
        self._probe_locks = {g: threading.Lock() for g in self.fleet.groups}
        self._reprobes: set[threading.Thread] = set()  # background re-probes, guarded by _reprobes_lock
        self._reprobes_lock = threading.Lock()

    def close(self, timeout_s: float = 5.0) -> None:
        """Wait (bounded) for background re-probes, then close the connection pool."""
        deadline = time.monotonic() + timeout_s
        self._stop_listening(timeout_s / 2)  # its read in flight ends within its own timeout
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

    # ---- running flows -------------------------------------------------------------------------

    def _finish(self, flow: fx.Flow) -> Any:
        run = fx.FlowRun(flow)
        for _ in self._steps(run):
            pass
        return run.value

    def _stream(self, flow: fx.Flow) -> Iterator[str]:
        return self._steps(fx.FlowRun(flow))

    def _steps(self, run: fx.FlowRun) -> Iterator[str]:
        """Perform the flow's effects in this thread; yield the text it gives the caller."""
        try:
            for effect in run:
                if type(effect) is fx.Emit:
                    yield effect.text
                else:
                    run.settle(self._effects[type(effect)], self, effect)
        finally:
            for stream in run.close():
                with contextlib.suppress(Exception):  # one that fails to close must not keep the others open
                    stream.response.close()
            run.raise_cleanup_error()

    def _start_reprobe(self, g: ReplicaGroup) -> None:
        with self._reprobes_lock:  # closed is checked, and the thread started, under close()'s lock
            if self._core.closed or not g.try_start_reprobe():
                return
            thread = threading.Thread(
                target=self._reprobe_thread, args=(g,), name=f"model-server-reprobe-{g.name}", daemon=True
            )
            self._reprobes.add(thread)
            try:
                thread.start()
            except RuntimeError as err:  # "can't start new thread": the caller's request must not pay for it
                self._reprobes.discard(thread)
                g.end_reprobe()
                log.warning("could not start a background re-probe of group '%s': %s", g.name, err)

    def _reprobe_thread(self, g: ReplicaGroup) -> None:
        try:
            self._finish(self._reprobe(g))
        finally:
            with self._reprobes_lock:
                self._reprobes.discard(threading.current_thread())

    # ---- effects, blocking -----------------------------------------------------------------------

    @staticmethod
    def _within(deadline: fx.Deadline, read: Callable[[], Any]) -> Any:
        """``read()`` with every socket wait cut to the deadline; DeadlineExceeded once it has passed."""
        set_deadline(deadline.at_s)
        try:
            return read()
        except httpx.TimeoutException as err:
            if deadline.passed():
                raise deadline.exceeded() from err
            raise
        finally:
            set_deadline(None)

    def _send(self, effect: fx.Send) -> fx.OpenStream:
        request = self._http.build_request(
            "POST", effect.url, content=effect.content, headers=dict(effect.headers), params=effect.query or None
        )
        response = self._within(effect.deadline, lambda: self._http.send(request, stream=True))
        return fx.OpenStream(response, response.iter_lines(), response.status_code)

    def _read(self, effect: fx.Read) -> str | bytes | None:
        if effect.whole:
            return self._within(effect.deadline, effect.stream.response.read)
        return self._within(effect.deadline, lambda: next(effect.stream.lines, None))

    def _close(self, effect: fx.Close) -> None:
        effect.stream.response.close()

    def _pause(self, effect: fx.Sleep) -> None:
        self._sleep(effect.delay_s)

    def _lock_probes(self, effect: fx.LockProbes) -> threading.Lock | None:
        lock = self._probe_locks[effect.group]
        return lock if lock.acquire(timeout=effect.wait_s) else None

    def _probe_replicas(self, effect: fx.ProbeReplicas) -> Any:
        return self._prober(
            effect.specs,
            effect.timeout_s,
            client=self._http,
            suspects=effect.suspects,
            patient=effect.patient,
            api_key=effect.api_key,
            connect_timeout_s=effect.connect_timeout_s,
        )

    def _concurrently(self, effect: fx.Concurrently) -> dict[str, Any]:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(effect.flows))) as pool:
            return dict(zip(effect.flows, pool.map(self._finish, effect.flows.values())))
