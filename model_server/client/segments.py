"""One replica's part of a stream (a *segment*): the decisions while it opens, streams and ends (pure).

A stream that breaks is resumed on another replica as a new segment; these
objects decide, line by line, when the first token has come, when a chunk is
late (the stall deadline), how the segment ended and what it is charged with.
The flows in :mod:`model_server.client.base` feed them what the drivers read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from openai.types import CompletionUsage

from model_server.client.answer import StreamAssembly
from model_server.client.effects import Deadline
from model_server.client.replica_group import Lease, ReplicaGroup
from model_server.client.request_plan import Call, RequestState, note_failure
from model_server.client.requests import parse_event
from model_server.client.retry import MalformedResponse, OutcomeKind, classify, describe
from model_server.client.wire import DeadlineExceeded, sse_data

if TYPE_CHECKING:  # pragma: no cover
    from model_server.client.core import ClientCore

__all__ = ["OpenedSegment", "SegmentOpening", "SegmentReading", "SegmentTally", "StallClock", "StreamResult"]


@dataclass
class OpenedSegment:
    """A replica's stream that has sent its first token (or ended without one); ``stream`` is the driver's handle."""

    stream: Any
    first: str
    first_at: float
    stall_s: float
    ended: bool = False


class SegmentOpening:
    """The decisions while a segment waits for its first token, one line at a time (the drivers only read).

    :meth:`feed` returns None to read on, or the :class:`OpenedSegment`; :meth:`ended` decides a stream
    that closed first. A chunk without a token (role only, empty) does not count as the first token.
    """

    def __init__(self, core: ClientCore, call: Call, assembly: StreamAssembly, stream: Any) -> None:
        self.core, self.call, self.assembly, self.stream = core, call, assembly, stream
        if not assembly.text:
            assembly.restart()  # an earlier attempt that failed before any text leaves nothing behind
        assembly.begin_segment()

    def _opened(self, first: str, ended: bool = False) -> OpenedSegment:
        return OpenedSegment(self.stream, first, self.core.clock(), self.call.deadlines.stall_s, ended)

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
    """What a finished (or running) stream delivered: ``text``, ``usage``, ``resumes`` (ChatStream's and its twin's).

    ``pieces`` is the driver's iterator of the caller's text (sync or async).
    """

    def __init__(self, pieces: Any, assembly: StreamAssembly, state: RequestState) -> None:
        self._pieces = pieces
        self._assembly = assembly
        self._state = state

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

    def as_deadline(self, replica: str) -> Deadline:
        """The socket deadline for the read that waits for the next token."""
        return Deadline(self.deadline, "chunk after a stall", self.stall_s, replica)

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
            self.lease,
            self.outcome,
            error=self.error,
            output_tokens=max(1, tokens),
            gap_s=gap if self.outcome is OutcomeKind.OK else None,
        )
        return reprobe and not self.core.closed
