"""What a client call asks its driver to do, and the loop that feeds the answers back (sans-IO).

Every public call of the client is a *flow*: a generator, written once in
:mod:`model_server.client.base`, that yields effects (send this request,
read a line before this deadline, sleep, probe the group, give the caller
this text) and receives their results. :class:`ModelServer` performs them
with blocking calls, :class:`AsyncModelServer` with awaits; neither decides
anything. A test can run a flow against a fake transport and a fake clock.

An effect that fails is thrown back into the flow at the ``yield``, so the
flow's own ``try``/``except`` sees the error exactly where the I/O was.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any

from model_server.client.request_plan import Sleep
from model_server.client.retry import DeadlineExceeded

__all__ = [
    "Close",
    "Concurrently",
    "Deadline",
    "Emit",
    "Flow",
    "FlowRun",
    "LockProbes",
    "OpenStream",
    "ProbeReplicas",
    "Read",
    "Send",
    "Sleep",
]

Flow = Generator[Any, Any, Any]


@dataclass(frozen=True)
class Deadline:
    """An instant (``time.monotonic()``) that an I/O step must finish by, and what to call it if it does not."""

    at_s: float
    phase: str  # "first token", "chunk after a stall", "answer"
    limit_s: float  # the deadline as the policy gave it, for the message
    replica: str

    @classmethod
    def after(cls, limit_s: float, phase: str, replica: str) -> Deadline:
        return cls(time.monotonic() + limit_s, phase, limit_s, replica)

    def left_s(self) -> float:
        return max(0.001, self.at_s - time.monotonic())

    def passed(self) -> bool:
        return time.monotonic() >= self.at_s

    def exceeded(self) -> DeadlineExceeded:
        return DeadlineExceeded(self.phase, self.limit_s, self.replica)


@dataclass(frozen=True)
class Send:
    """POST ``content`` to ``url`` and answer with a stream handle once the status line and headers arrived."""

    url: str
    content: bytes
    headers: Mapping[str, str]
    query: Mapping[str, Any]
    deadline: Deadline


@dataclass(frozen=True)
class OpenStream:
    """A driver's handle on a response whose body is still coming: the response, its lines, its status."""

    response: Any
    lines: Any
    status_code: int


@dataclass(frozen=True)
class Read:
    """The stream's next line (str; None at its end), or with ``whole`` the rest of its body (bytes)."""

    stream: OpenStream
    deadline: Deadline
    whole: bool = False


@dataclass(frozen=True)
class Close:
    """Close the stream now (frees its connection); a driver also closes what a flow left open."""

    stream: Any


@dataclass(frozen=True)
class LockProbes:
    """The group's probe lock within ``wait_s``: answer with the lock (``release()`` is never blocking) or None."""

    group: str
    wait_s: float


@dataclass(frozen=True)
class ProbeReplicas:
    """Probe these replicas at once (see :func:`model_server.client.probe.probe_group`); answer with the results."""

    specs: tuple[Any, ...]
    timeout_s: float
    suspects: frozenset[str]
    patient: bool
    api_key: str | None
    connect_timeout_s: float


@dataclass(frozen=True)
class Concurrently:
    """Run these flows at the same time; answer with ``{name: result}``."""

    flows: Mapping[str, Flow]


@dataclass(frozen=True)
class Emit:
    """Give the caller this piece of a streamed answer; the flow goes on when the caller asks for more."""

    text: str


@dataclass
class FlowRun:
    """One flow being run: the next effect, the answer to the last one, the streams it opened.

    A driver loops ``for effect in run`` and performs each through :meth:`settle` (or :meth:`asettle`):
    the result is sent into the flow, an exception thrown into it at the ``yield``. ``value`` is what the
    flow returned. ``close()`` ends an unfinished flow (its ``finally`` blocks run) and lists the
    streams it left open, for the driver to close.
    """

    flow: Flow
    result: Any = None
    value: Any = None
    opened: list[Any] = field(default_factory=list)
    _error: BaseException | None = None
    _done: bool = False
    _last: Any = None
    cleanup_error: Exception | None = None

    def __iter__(self) -> FlowRun:
        return self

    def __next__(self) -> Any:
        error, self._error = self._error, None
        result, self.result = self.result, None
        if error is None and isinstance(self._last, Send):
            self.opened.append(result)  # closed by the driver if the flow leaves it open
        try:
            effect = self.flow.throw(error) if error is not None else self.flow.send(result)
        except StopIteration as stop:
            self._done = True
            self.value = stop.value
            raise StopIteration from None
        self._last = effect
        return effect

    def settle(self, perform: Callable[[Any, Any], Any], driver: Any, effect: Any) -> None:
        """``perform(driver, effect)``; its result, or its exception, goes to the flow on the next step."""
        try:
            self.result = perform(driver, effect)
        except BaseException as err:  # thrown into the flow, which releases what it holds and re-raises
            self._error = err

    async def asettle(self, perform: Callable[[Any, Any], Any], driver: Any, effect: Any) -> None:
        """:meth:`settle` for a driver whose effects are coroutines."""
        try:
            self.result = await perform(driver, effect)
        except BaseException as err:
            self._error = err

    def close(self) -> list[Any]:
        """End the flow if it is still running; the streams to close (those it did not close itself).

        The streams are listed even when the flow's own clean-up raised: that error waits in
        ``cleanup_error`` until the driver has closed them (:meth:`raise_cleanup_error`).
        """
        if not self._done:
            self._done = True
            try:
                self.flow.close()
            except Exception as err:  # raised by the driver once it has closed the streams
                self.cleanup_error = err
        left, self.opened = [s for s in self.opened if not is_closed(s)], []
        return left

    def raise_cleanup_error(self) -> None:
        if self.cleanup_error is not None:
            raise self.cleanup_error


def is_closed(stream: OpenStream) -> bool:
    return bool(stream.response.is_closed)


def effect_table(driver: type, names: Mapping[type, str]) -> dict[type, Callable[[Any, Any], Any]]:
    """``{effect type: the driver class's function}``: what a driver performs each effect with.

    Functions of the class, not bound methods of an instance, so that a client holds no
    reference cycle to itself (one dropped without ``close()`` frees its pool at once).
    """
    return {kind: getattr(driver, name) for kind, name in names.items()}


EFFECT_METHODS: Mapping[type, str] = {
    Send: "_send",
    Read: "_read",
    Close: "_close",
    Sleep: "_pause",
    LockProbes: "_lock_probes",
    ProbeReplicas: "_probe_replicas",
    Concurrently: "_concurrently",
}
