"""Every call of ModelServer and AsyncModelServer, written once as a flow of effects.

:class:`ClientBase` holds the public methods' shape and, for each, a *flow*
(a generator, see :mod:`model_server.client.effects`): the retry plan run
attempt by attempt, a stream opened, read, given to the caller and resumed
on another replica where it breaks, probe rounds, warmups, re-probes. A
flow decides everything and waits for nothing: it yields "send this", "read
a line before this deadline", "sleep", "probe these replicas", "give the
caller this text", and a driver performs them, blocking
(:mod:`~model_server.client.sync_driver`) or awaiting
(:mod:`~model_server.client.async_driver`). A public method here hands its
flow to the driver's ``_finish`` (the call's result; a coroutine in the
async client) or ``_stream`` (the caller's chunks).
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
import weakref
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

from model_server.client.answer import StreamAssembly, embedding_vectors
from model_server.client.control_listener import ControlListener
from model_server.client.core import ClientCore, fleet_from
from model_server.client.deadlines import GroupTiming
from model_server.client.effects import (
    EFFECT_METHODS,
    Close,
    Concurrently,
    Deadline,
    Emit,
    Flow,
    LockProbes,
    OpenStream,
    ProbeReplicas,
    Read,
    Send,
    effect_table,
)
from model_server.client.metrics import ClientMetrics
from model_server.client.replica import EndpointSnapshot
from model_server.client.replica_group import ReplicaGroup
from model_server.client.request_plan import Call, CallResult, Done, Probe, RequestState
from model_server.client.requests import ChatRequest, EmbedRequest, chat_request, embed_request, parse_event
from model_server.client.retry import OutcomeKind
from model_server.client.segments import OpenedSegment, SegmentOpening, SegmentReading, SegmentTally
from model_server.config import ClientPolicy, Fleet, ServerKind
from model_server.errors import GroupUnavailableError, RequestRejectedError

__all__ = ["ClientBase"]

log = logging.getLogger("model_server.client")

Attempt = Callable[[Call], Generator[Any, Any, tuple[Any, "int | None"]]]


class ClientBase:
    """What both clients are: the table, the policy, the public methods, and one flow per call.

    ``config``: a fleet table path or a :class:`Fleet`; default ``$MODEL_SERVER_CONFIG``, else the
    table for this machine (see :mod:`model_server.common.fleet_choice`). ``state_path`` overrides
    ``client.run_state_file``; ``policy`` overrides the table's ``[client]`` section;
    ``metrics_registry`` turns on Prometheus metrics (see :mod:`model_server.client.metrics`).
    Seams for tests: ``clock``, ``rng``, ``sleep``, ``transport`` (an httpx transport of the
    driver's kind, e.g. ``httpx.MockTransport``) and ``prober`` (in place of ``probe_group``).

    A driver subclass sets ``_stream_type``, ``_default_sleep`` and ``_default_prober`` and
    implements ``_connect``, ``_finish(flow)``, ``_stream(flow)``, ``_start_reprobe(group)`` and one
    method per effect (see ``EFFECT_METHODS``).
    """

    _stream_type: Callable[..., Any]
    _default_sleep: Callable[[float], Any]
    _default_prober: Callable[..., Any]

    def __init__(
        self,
        config: str | os.PathLike[str] | Fleet | None = None,
        *,
        state_path: str | os.PathLike[str] | None = None,
        policy: ClientPolicy | None = None,
        metrics_registry: Any = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        sleep: Callable[[float], Any] | None = None,
        transport: Any = None,
        prober: Callable[..., Any] | None = None,
    ) -> None:
        fleet = fleet_from(config)
        self.fleet = fleet
        self.policy = policy or fleet.client
        state = state_path if state_path is not None else self.policy.run_state_file
        self._core = ClientCore(
            fleet, self.policy, Path(state) if state is not None else None, ClientMetrics(metrics_registry), clock,
            rng or random.Random(),
        )  # fmt: skip
        self._sleep = sleep or self._default_sleep
        self._prober = prober or self._default_prober
        self._effects = effect_table(type(self), EFFECT_METHODS)
        self._connect(transport)
        view = self._core.view
        self._listener = ControlListener(fleet, self.policy, view).start() if view is not None else None
        if self._listener is not None:  # a client never closed must not leave its readers polling for good
            weakref.finalize(self, self._listener.stop)

    # ---- the public methods (in the async client each returns an awaitable) ----------------

    @property
    def groups(self) -> tuple[str, ...]:
        return self._core.group_names

    def warmup(self, groups: Sequence[str] | None = None) -> Any:
        """Build every group (or those named) now, concurrently; GroupUnavailableError for a dead one.

        Returns ``{group: True}`` for every group built.
        """
        return self._finish(self._warmup(groups))

    def chat(self, group: str | int, messages: list[dict[str, Any]], **params: Any) -> Any:
        """An openai ChatCompletion from the group's best replica (``params`` as for the openai SDK).

        Streamed under the hood, so a hung replica costs at most the first-token deadline and a
        broken answer is resumed elsewhere; the ChatCompletion (usage included) is the same.
        """
        request = functools.partial(chat_request, "chat", messages, params, self.policy)
        return self._finish(self._call(self._chat, group, ServerKind.completion, request))

    def embed(self, group: str | int, inputs: Any, **params: Any) -> Any:
        """One vector for one input (a string, or a list of token ids); a list of vectors for a batch."""
        request = functools.partial(embed_request, inputs, params)
        return self._finish(self._call(self._embed, group, ServerKind.embedding, request))

    def get_completion_or_embedding(
        self,
        model_size: str | int,
        message: Any,
        temperature: float = 0.0,
        max_tokens: int = 256,
        get_embedding: bool = False,
    ) -> Any:
        """The original call shape: chat messages -> reply text; a string with get_embedding=True -> a vector."""
        if get_embedding:
            return self.embed(model_size, message)
        params = {"temperature": temperature, "max_tokens": max_tokens}
        request = functools.partial(chat_request, "chat", message, params, self.policy)
        return self._finish(self._call(self._chat_text, model_size, ServerKind.completion, request))

    def stream_chat(self, group: str | int, messages: list[dict[str, Any]], **params: Any) -> Any:
        """The text chunks of a streamed reply (a ChatStream; AsyncChatStream for ``async for``).

        Failover and resume are invisible. A wrong group or parameter is reported here, at the
        call; the request is sent when the first chunk is asked for.
        """
        req = chat_request("stream_chat", messages, params, self.policy)
        g = self._core.group(group, ServerKind.completion)
        assembly = StreamAssembly(req.kind, req.rich)
        state = self._core.new_state()
        return self._stream_type(self._stream(self._segments(g, req, assembly, state)), assembly, state)

    def stats(self) -> dict[str, dict[str, EndpointSnapshot]]:
        """Each built group's replicas: breaker, latency, in flight, attempts, failures."""
        return self._core.stats()

    def pipeline_states(self) -> dict[str, str]:
        """Replica name -> the state its pipeline's control API last gave (READY, DRAINING, ...).

        Empty when the table has no ``launch.control_port`` (or ``client.control_refresh_s = 0``);
        a host whose control API does not answer has no entries (the client routes there on its own probes).
        """
        view = self._core.view
        return view.states() if view is not None else {}

    def _stop_listening(self, timeout_s: float = 0.0) -> None:
        if self._listener is not None:
            self._listener.stop(timeout_s)

    def timing(self, group: str | int) -> GroupTiming:
        """The group's smoothed time to first token and gap between chunks, and the deadlines they give now."""
        return self._core.timing(group)

    # ---- what a driver provides ---------------------------------------------------------------

    def _connect(self, transport: Any) -> None:  # pragma: no cover - every driver overrides
        """Set up the driver's connection pool (through ``transport`` if given) and its locks."""
        raise NotImplementedError

    def _finish(self, flow: Flow) -> Any:  # pragma: no cover
        raise NotImplementedError

    def _stream(self, flow: Flow) -> Any:  # pragma: no cover
        raise NotImplementedError

    def _start_reprobe(self, group: ReplicaGroup) -> None:  # pragma: no cover
        raise NotImplementedError

    # ---- flows: calls ---------------------------------------------------------------------------

    def _call(self, flow: Callable[..., Flow], group: str | int, kind: ServerKind, request: Callable[[], Any]) -> Flow:
        """Check the arguments and the group, then run ``flow``.

        Inside the flow, so that the async client raises a bad argument where the call is awaited
        (as an ``async def`` does); the sync one raises it at the call, as before.
        """
        req = request()
        return (yield from flow(self._core.group(group, kind), req))

    def _warmup(self, groups: Sequence[str] | None) -> Flow:
        built = self._core.warmup_groups(groups)
        found = yield Concurrently({name: self._build(g) for name, g in built.items()})
        self._core.raise_if_dead(built, found)
        return found

    def _build(self, g: ReplicaGroup) -> Flow:
        for _ in range(self.policy.build_rounds):
            if (yield from self._probe_round(g, self._core.fresh_probe(g))):
                return True
        return False

    def _chat(self, g: ReplicaGroup, req: ChatRequest) -> Flow:
        assembly = StreamAssembly(req.kind, req.rich)
        yield from self._segments(g, req, assembly, self._core.new_state())
        return assembly.chat_completion()

    def _chat_text(self, g: ReplicaGroup, req: ChatRequest) -> Flow:
        reply = yield from self._chat(g, req)
        return reply.choices[0].message.content or ""

    def _embed(self, g: ReplicaGroup, req: EmbedRequest) -> Flow:
        attempt = functools.partial(self._embed_attempt, req)
        done = yield from self._attempts(g, self._core.new_state(), attempt, prompt_tokens=req.prompt_tokens)
        return done.value[0] if req.single else done.value

    def _embed_attempt(self, req: EmbedRequest, call: Call) -> Flow:
        spec = call.lease.spec
        deadline = Deadline.after(call.timeout_s, "answer", spec.name)
        headers = self._core.headers(spec.group, req.headers)
        stream = yield Send(spec.base_url + "/embeddings", req.encoded(spec), headers, req.query, deadline)
        try:
            raw = yield Read(stream, deadline, whole=True)
        except Exception:
            yield Close(stream)  # now: not held through the backoff and the next attempts
            raise
        if stream.status_code >= 400:
            raise self._core.http_error(stream.status_code, raw)
        return embedding_vectors(parse_event(raw.decode("utf-8", "replace")), req.count), None

    # ---- flows: the retry plan, attempt by attempt ------------------------------------------------

    def _attempts(
        self, g: ReplicaGroup, state: RequestState, attempt: Attempt, hold_lease: bool = False, prompt_tokens: int = 0
    ) -> Flow:
        """Run the call's plan (:mod:`model_server.client.request_plan`): each Call through ``attempt``."""
        plan = self._core.plan(g, state, hold_lease, prompt_tokens)
        try:
            action = next(plan)
            while True:
                if isinstance(action, Call):
                    result = yield from self._perform(g, attempt, action)
                elif isinstance(action, Probe):
                    result = yield from self._probe_round(g, action)
                else:  # Sleep: the driver's sleep
                    result = yield action
                action = plan.send(result)
        except StopIteration as stop:
            done: Done = stop.value
            if self._core.reprobe_after(done):
                self._start_reprobe(g)
            return done
        except GroupUnavailableError:
            self._core.unavailable(g)
            raise

    def _perform(self, g: ReplicaGroup, attempt: Attempt, call: Call) -> Flow:
        try:
            value, tokens = yield from attempt(call)
        except Exception as err:
            return self._core.failed(g, call, err)
        except BaseException:  # cancelled, or the caller left: the lease goes back uncharged
            g.release(call.lease, None)
            raise
        return CallResult(OutcomeKind.OK, value, output_tokens=tokens)

    def _probe_round(self, g: ReplicaGroup, probe: Probe, patient: bool = False) -> Flow:
        """One probe round of the group; callers arriving meanwhile wait for it instead of probing again.

        ``patient``: a background round, which waits for every replica (see probe_group).
        """
        lock = yield LockProbes(g.name, probe.wait_s)
        if lock is None:
            return False
        try:
            joined = self._core.joined_round(g, probe)
            if joined is not None:
                return joined
            specs = g.probe_specs()
            if not specs:
                return g.note_round_without_probes()
            results = yield ProbeReplicas(
                specs, probe.timeout_s, frozenset(g.suspects()), patient, **self._core.probe_kwargs(g.name)
            )
            return g.apply_probes(results, probe.timeout_s)
        finally:
            lock.release()

    def _reprobe(self, g: ReplicaGroup) -> Flow:
        """The background re-probe of a group with a degraded replica or one out of rotation."""
        try:
            if g.wants_reprobe():
                yield from self._probe_round(g, self._core.fresh_probe(g), patient=True)
        except Exception:  # never let a background probe kill anything
            log.exception("background re-probe of group '%s' failed", g.name)
        finally:
            g.end_reprobe()

    # ---- flows: streams, segment by segment, resumed where one breaks --------------------------------

    def _segments(self, g: ReplicaGroup, req: ChatRequest, assembly: StreamAssembly, state: RequestState) -> Flow:
        body: dict[str, Any] | None = req.body
        previous: str | None = None
        while body is not None:
            attempt = functools.partial(self._open, req, body, assembly)
            try:
                done = yield from self._attempts(
                    g, state, attempt, hold_lease=True, prompt_tokens=req.prompt_tokens + assembly.tokens
                )
            except (GroupUnavailableError, RequestRejectedError) as err:
                body, previous = self._core.after_refused(g, req, state, assembly, err, previous), None
                continue
            opened: OpenedSegment = done.value
            if previous is not None:
                self._core.note_resumed(g, previous, done.lease, assembly)
            tally = self._core.segment(g, done.lease, opened.stall_s)
            broken = yield from self._relay(g, opened, tally, assembly, state)
            if broken is None:
                return
            previous = done.lease.spec.name if assembly.text else None
            body = self._core.after_break(g, req, state, assembly, body, tally)

    def _open(self, req: ChatRequest, body: dict[str, Any], assembly: StreamAssembly, call: Call) -> Flow:
        """Send one segment's request and read up to its first token, all within the first-token deadline."""
        spec = call.lease.spec
        deadline = Deadline.after(call.deadlines.first_token_s, "first token", spec.name)
        headers = self._core.headers(spec.group, req.headers)
        stream: OpenStream = yield Send(spec.base_url + req.path, req.encoded(spec, body), headers, req.query, deadline)
        try:
            if stream.status_code >= 400:
                raise self._core.http_error(stream.status_code, (yield Read(stream, deadline, whole=True)))
            opening = SegmentOpening(self._core, call, assembly, stream)
            while (line := (yield Read(stream, deadline))) is not None:
                opened = opening.feed(line)
                if opened is not None:
                    return opened, None
            return opening.ended(), None
        except Exception:
            yield Close(stream)
            raise

    def _relay(
        self, g: ReplicaGroup, opened: OpenedSegment, tally: SegmentTally, assembly: StreamAssembly, state: RequestState
    ) -> Flow:
        """Give the caller one segment's text; return None when it ended, else the error that broke it."""
        tally.started(opened.first_at)
        broken: BaseException | None = None
        try:
            try:
                if opened.first:
                    yield Emit(opened.first)
                if not opened.ended:
                    yield from self._rest(opened, tally, assembly)
                tally.ended()
            except Exception as err:
                if self._core.ends_whole(assembly, err):
                    tally.ended()
                else:
                    broken = tally.broke(err)
                    if broken is None:
                        raise
            yield Close(opened.stream)  # before the lease goes back: the replica is done with it
        finally:  # also when the caller stops early (then the driver closes the stream, just after)
            if tally.release(state, assembly.segment_tokens_so_far):
                self._start_reprobe(g)
        return broken

    def _rest(self, opened: OpenedSegment, tally: SegmentTally, assembly: StreamAssembly) -> Flow:
        reading = SegmentReading(self._core, tally, assembly, opened.stall_s)
        replica = tally.lease.spec.name
        while True:
            # The stall deadline runs while the driver reads, never while the caller holds the text.
            line = yield Read(opened.stream, reading.stall.as_deadline(replica))
            if line is None:
                reading.ended()
                return
            text = reading.feed(line)
            if text is None:
                return
            if text:
                yield Emit(text)
