"""ModelServer: send completions and embeddings to a group's healthy replicas.

Application code names a *group* of the fleet table ("8" for the 8B chat
replicas, "7" for embeddings, ...); the client picks a replica by the routing
policy, holds every attempt to a first-token deadline and a stall deadline
(:mod:`model_server.client.deadlines`), fails over to the next replica on a
connection error, a missed deadline, a 5xx, 429 or malformed answer (with
jittered backoff, inside one budget per call: :mod:`model_server.client.request_plan`),
keeps a circuit breaker per replica, re-probes replicas that are degraded or
out of rotation, and resumes a stream that breaks after text arrived on
another replica (:mod:`model_server.client.resume`). A chat answer is streamed under
the hood even when the caller wants it whole, so that the same deadlines and
resumes protect it. One ``ModelServer`` is meant to be shared by every thread
of a process.

Exceptions (all under :class:`model_server.errors.ModelServerError`)::

    ClientError                      anything the client raises on purpose
    ├── UnknownGroupError            no such group in the table (also a KeyError); lists the groups
    ├── InvalidRequestError          the arguments cannot make a request (also TypeError, ValueError):
    │                                no attempt spent; .argument
    ├── RequestRejectedError         the server says the request is wrong (400/404/413/422, 401/403):
    │                                never retried, never held against a replica; .status, .body
    ├── UnexpectedAnswerError        a well-formed answer that does not fit the request: not retried
    ├── GroupUnavailableError        the call's bounds are spent and no replica answered;
    │                                .attempts = ((replica, error, elapsed_s), ...)
    └── StreamInterruptedError       a stream broke after text arrived and was not resumed;
                                     .text = what arrived, .why_not_resumed

:class:`AsyncModelServer` (in :mod:`model_server.client.async_driver`) has the same
methods for asyncio code.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import httpx
from openai.types.chat import ChatCompletion

from model_server.client.answer import StreamAssembly, embedding_vectors
from model_server.client.base import (
    POOL_CONNECTIONS,
    POOL_KEEPALIVE,
    ChatRequest,
    ClientCore,
    OpenedSegment,
    SegmentOpening,
    SegmentReading,
    SegmentTally,
    StreamResult,
    parse_event,
)
from model_server.errors import (
    GroupUnavailableError,
    InvalidRequestError,
    RequestRejectedError,
    StreamInterruptedError,
    UnexpectedAnswerError,
    UnknownGroupError,
)
from model_server.config import ClientPolicy, Fleet, ServerKind
from model_server.client.deadline_transport import deadline_transport, set_deadline
from model_server.client.replica import EndpointSnapshot
from model_server.errors import ClientError
from model_server.client.probe import probe_group
from model_server.client.replica_group import ReplicaGroup
from model_server.client.request_plan import Call, CallResult, Done, Probe, RequestState, Sleep
from model_server.client.retry import DeadlineExceeded, OutcomeKind

__all__ = [
    "ChatStream",
    "ClientError",
    "GroupUnavailableError",
    "InvalidRequestError",
    "ModelServer",
    "RequestRejectedError",
    "StreamInterruptedError",
    "UnexpectedAnswerError",
    "UnknownGroupError",
]

log = logging.getLogger("model_server.client")

SyncOp = Callable[[Call], tuple[Any, "int | None"]]


class ChatStream(StreamResult):
    """The text of a streamed chat answer, chunk by chunk (an iterator of str).

    After the iteration: ``text`` (the whole answer), ``usage`` (prompt tokens once, completion
    tokens of every segment summed; None if the server sent none), ``resumes`` (how often the
    stream continued on another replica). ``close()`` (or leaving a ``with`` block) frees the
    replica at once when the caller stops early.
    """

    def __init__(self, pieces: Iterator[str], assembly: StreamAssembly, state: RequestState) -> None:
        self._pieces = pieces
        self._assembly = assembly
        self._state = state

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


class ModelServer:
    """A thread-safe client of the fleet's groups, with deadlines, failover, resumes, breakers and re-probes.

    ``config``: a fleet table path or a :class:`Fleet`; default ``$MODEL_SERVER_CONFIG``,
    else ``configs/servers.toml``. ``state_path`` overrides ``client.run_state_file``;
    ``policy`` overrides the table's ``[client]`` section; ``metrics_registry`` turns on
    Prometheus metrics (see :mod:`model_server.client.metrics`). ``clock``, ``rng``,
    ``sleep`` and ``transport`` (an httpx transport, e.g. ``httpx.MockTransport``) are seams for tests.
    """

    def __init__(
        self, config: str | os.PathLike[str] | Fleet | None = None, *, state_path: str | os.PathLike[str] | None = None,
        policy: ClientPolicy | None = None, metrics_registry: Any = None,
        clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep, transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._core = ClientCore(config, state_path, policy, metrics_registry, clock, rng)
        self.policy = self._core.policy
        self.fleet = self._core.fleet
        self._sleep = sleep
        limits = httpx.Limits(max_connections=POOL_CONNECTIONS, max_keepalive_connections=POOL_KEEPALIVE)
        self._http = httpx.Client(
            transport=transport or deadline_transport(limits),
            timeout=httpx.Timeout(self.policy.request_timeout_ceiling_s, connect=self.policy.connect_timeout_s),
        )
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
        """An openai ChatCompletion from the group's best replica (``params`` as for the openai SDK).

        Streamed under the hood, so a hung replica costs at most the first-token deadline and a
        broken answer is resumed elsewhere; the ChatCompletion (usage included) is the same.
        """
        req = self._core.chat_request("chat", messages, params)
        g = self._core.group(group, ServerKind.completion)
        assembly = StreamAssembly(req.kind, req.rich)
        for _ in self._segments(g, req, assembly, self._core.new_state()):
            pass
        return assembly.chat_completion()

    def embed(self, group: str | int, inputs: Any, **params: Any) -> list[float] | list[list[float]]:
        """One vector for one input (a string, or a list of token ids); a list of vectors for a batch."""
        req = self._core.embed_request(inputs, params)
        g = self._core.group(group, ServerKind.embedding)

        def op(call: Call) -> tuple[Any, int | None]:
            spec = call.lease.spec
            limit = time.monotonic() + call.timeout_s
            set_deadline(limit)
            try:
                response = self._http.post(
                    spec.base_url + "/embeddings", content=req.encoded(spec), headers=self._core.headers(req.headers),
                    params=req.query or None,
                )
                if response.status_code >= 400:
                    raise self._core.http_error(response.status_code, response.content)
                data = parse_event(response.text)
            except httpx.TimeoutException as err:
                if time.monotonic() >= limit:
                    raise DeadlineExceeded("answer", call.timeout_s, spec.name) from err
                raise
            finally:
                set_deadline(None)
            return embedding_vectors(data, req.count), None

        vectors = self._drive(g, self._core.new_state(), op, prompt_tokens=req.prompt_tokens).value
        return vectors[0] if req.single else vectors

    def get_completion_or_embedding(
        self, model_size: str | int, message: Any, temperature: float = 0.0, max_tokens: int = 256,
        get_embedding: bool = False,
    ) -> Any:
        """The original call shape: chat messages -> reply text; a string with get_embedding=True -> a vector."""
        if get_embedding:
            return self.embed(model_size, message)
        reply = self.chat(model_size, message, temperature=temperature, max_tokens=max_tokens)
        return reply.choices[0].message.content or ""

    def stream_chat(self, group: str | int, messages: list[dict[str, Any]], **params: Any) -> ChatStream:
        """The text chunks of a streamed reply (a :class:`ChatStream`); failover and resume are invisible.

        A wrong group or parameter is reported here, at the call; the request is sent on the first ``next()``.
        """
        req = self._core.chat_request("stream_chat", messages, params)
        g = self._core.group(group, ServerKind.completion)
        assembly = StreamAssembly(req.kind, req.rich)
        state = self._core.new_state()
        return ChatStream(self._segments(g, req, assembly, state), assembly, state)

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

    # ---- streams: segments on replicas, resumed where one breaks ---------------------------------

    def _segments(
        self, g: ReplicaGroup, req: ChatRequest, assembly: StreamAssembly, state: RequestState
    ) -> Iterator[str]:
        body: dict[str, Any] | None = req.body
        previous: str | None = None
        while body is not None:
            segment_body = body
            try:
                done = self._drive(
                    g, state, lambda call: (self._open(req, segment_body, call, assembly), None), hold_lease=True,
                    prompt_tokens=req.prompt_tokens + assembly.tokens,
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

    def _open(self, req: ChatRequest, body: dict[str, Any], call: Call, assembly: StreamAssembly) -> OpenedSegment:
        """Send one segment's request and read up to its first token, all within the first-token deadline."""
        spec = call.lease.spec
        limit = time.monotonic() + call.deadlines.first_token_s
        set_deadline(limit)
        response: httpx.Response | None = None
        try:
            request = self._http.build_request(
                "POST", spec.base_url + req.path, content=req.encoded(spec, body),
                headers=self._core.headers(req.headers), params=req.query or None,
            )
            response = self._http.send(request, stream=True)
            if response.status_code >= 400:
                raise self._core.http_error(response.status_code, response.read())
            lines = response.iter_lines()
            opening = SegmentOpening(self._core, call, assembly, response, lines)
            for line in lines:
                opened = opening.feed(line)
                if opened is not None:
                    return opened
            return opening.ended()
        except BaseException as err:
            if response is not None:
                response.close()
            if isinstance(err, httpx.TimeoutException) and time.monotonic() >= limit:
                raise DeadlineExceeded("first token", call.deadlines.first_token_s, spec.name) from err
            raise
        finally:
            set_deadline(None)

    def _relay(
        self, g: ReplicaGroup, opened: OpenedSegment, tally: SegmentTally, assembly: StreamAssembly, state: RequestState
    ) -> Generator[str, None, BaseException | None]:
        """Yield one segment's text to the caller; return None when it ended, else the error that broke it."""
        tally.started(opened.first_at)
        broken: BaseException | None = None
        try:
            if opened.first:
                yield opened.first
            if not opened.ended and opened.lines is not None:
                yield from self._rest(opened, tally, assembly)
            tally.ended()
        except Exception as err:
            if self._core.ends_whole(assembly, err):
                tally.ended()
            else:
                broken = tally.broke(err)
                if broken is None:
                    raise
        finally:
            set_deadline(None)
            try:
                opened.response.close()
            finally:
                if tally.release(state, assembly.segment_tokens_so_far):
                    self._start_reprobe(g)
        return broken

    def _rest(self, opened: OpenedSegment, tally: SegmentTally, assembly: StreamAssembly) -> Iterator[str]:
        reading = SegmentReading(self._core, tally, assembly, opened.stall_s)
        while True:
            # The stall deadline runs while this thread reads, never while the caller holds the text.
            set_deadline(reading.stall.deadline)
            try:
                line = next(opened.lines)
            except StopIteration:
                reading.ended()
                return
            finally:
                set_deadline(None)
            text = reading.feed(line)
            if text is None:
                return
            if text:
                yield text

    # ---- the plan's driver: each decision is in ClientCore or the plan; only the blocking calls are here ----

    def _drive(
        self, g: ReplicaGroup, state: RequestState, op: SyncOp, hold_lease: bool = False, prompt_tokens: int = 0
    ) -> Done:
        plan = self._core.plan(g, state, hold_lease, prompt_tokens)
        try:
            action = next(plan)
            while True:
                if isinstance(action, Call):
                    result: Any = self._perform(g, op, action)
                elif isinstance(action, Sleep):
                    self._sleep(action.delay_s)
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
            value, tokens = op(call)
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

    def _probe_round(self, g: ReplicaGroup, probe: Probe, patient: bool = False) -> bool:
        """One probe round of the group; threads arriving meanwhile wait for it instead of probing again.

        ``patient``: a background round, which waits for every replica (see probe_group).
        """
        lock = self._probe_locks[g.name]
        if not lock.acquire(timeout=probe.wait_s):
            return False
        try:
            joined = self._core.joined_round(g, probe)
            if joined is not None:
                return joined
            results = probe_group(
                g.specs, probe.timeout_s, client=self._http, suspects=g.suspects(), patient=patient,
                **self._core.probe_kwargs(),
            )
            return g.apply_probes(results, probe.timeout_s)
        finally:
            lock.release()

    def _reprobe(self, g: ReplicaGroup) -> None:
        """The background re-probe of a group with a degraded replica or one out of rotation."""
        if g.wants_reprobe():
            self._probe_round(g, self._core.fresh_probe(g), patient=True)

    def _start_reprobe(self, g: ReplicaGroup) -> None:
        def run() -> None:
            try:
                self._reprobe(g)
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
