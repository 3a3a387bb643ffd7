"""What the pipelines' control APIs last said of each replica, and which replicas that keeps out (no I/O).

The pipeline is the source of truth for a replica's life: it knows a replica
is DRAINING, restarting or STARTING before any request finds out. The client
listens (:mod:`model_server.client.control_listener` reads each host's
``GET /status``) and keeps out of rotation, and out of its probe rounds, every
replica a fresh answer calls anything but READY. A replica heard READY again
after that (or with a new pid: a restart between two reads) stays out until
one of the client's own probes has seen it answer.

The client never depends on this view: a host whose control API does not
answer twice in a row is forgotten, an answer older than ``stale_after_s`` counts for
nothing, and then the client's own probes and breakers decide, as without a
control plane.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from model_server.common.control_status import Recorded

__all__ = ["READY", "ControlView", "Heard", "HostNews"]

READY = "READY"


@dataclass(frozen=True)
class Heard:
    """One replica as its host's control API last described it, at ``heard_s`` (the client's clock)."""

    host: str
    state: str
    pid: int | None
    heard_s: float


@dataclass(frozen=True)
class HostNews:
    """What one read of a host changed, for the log: replicas that left READY, and those that came back."""

    left: tuple[tuple[str, str], ...] = ()  # (name, state)
    back: tuple[str, ...] = ()


class ControlView:
    """Thread-safe: the listener's threads write it, every request reads it."""

    def __init__(self, hosts: Mapping[str, str], stale_after_s: float, clock: Callable[[], float]) -> None:
        """``hosts``: replica name -> its host in the table (only those replicas are heard)."""
        self._hosts = dict(hosts)
        self.stale_after_s = stale_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._heard: dict[str, Heard] = {}
        self._unprobed: set[str] = set()  # heard READY again, not yet seen answering a probe of ours
        # Nothing held out: every replica heard is READY and probed. Set with each write, read without the lock,
        # so that a request in the usual case (the whole fleet READY) pays one attribute read here.
        self._quiet = True

    @property
    def hosts(self) -> tuple[str, ...]:
        """The hosts whose control APIs speak for these replicas, in order."""
        return tuple(sorted(set(self._hosts.values())))

    def _settle(self) -> None:
        """With the lock held, after a write: whether anything can be held out now."""
        self._quiet = not self._unprobed and all(h.state == READY for h in self._heard.values())

    def heard(self, host: str, servers: Mapping[str, Recorded]) -> HostNews:
        """Fold one ``GET /status`` answer of ``host`` (parsed: server name -> what its pipeline says) into the view."""
        now = self._clock()
        left: list[tuple[str, str]] = []
        back: list[str] = []
        with self._lock:
            for name, said in servers.items():
                if self._hosts.get(name) != host:  # a host speaks only for its own replicas of the table
                    continue
                before = self._heard.get(name)
                self._heard[name] = Heard(host, said.state, said.pid, now)
                if before is None:
                    if said.state != READY:
                        left.append((name, said.state))
                    continue
                if said.state != READY and before.state == READY:
                    left.append((name, said.state))
                elif said.state == READY and (
                    before.state != READY or (said.pid is not None and said.pid != before.pid)
                ):
                    self._unprobed.add(name)
                    back.append(name)
            self._settle()
        return HostNews(tuple(left), tuple(back))

    def lost(self, host: str) -> bool:
        """``host``'s control API did not answer: forget what it said. True if there was something to forget."""
        with self._lock:
            gone = [name for name, h in self._heard.items() if h.host == host]
            for name in gone:
                del self._heard[name]
                self._unprobed.discard(name)
            self._settle()
        return bool(gone)

    def probed(self, name: str) -> None:
        """One of our probes saw ``name`` answer: a replica heard READY again may take requests."""
        if self._quiet:
            return
        with self._lock:
            self._unprobed.discard(name)
            self._settle()

    def _fresh(self, name: str, now: float) -> Heard | None:
        heard = self._heard.get(name)
        return heard if heard is not None and now - heard.heard_s <= self.stale_after_s else None

    def not_ready(self, names: Iterable[str]) -> frozenset[str]:
        """Replicas a fresh answer calls anything but READY: no request, no probe."""
        if self._quiet:
            return frozenset()
        now = self._clock()
        with self._lock:
            return frozenset(n for n in names if (h := self._fresh(n, now)) is not None and h.state != READY)

    def held_out(self, names: Iterable[str]) -> frozenset[str]:
        """Replicas that get no request: not READY, or READY again and not yet probed."""
        if self._quiet:
            return frozenset()
        now = self._clock()
        with self._lock:
            return frozenset(
                n for n in names if (h := self._fresh(n, now)) is not None and (h.state != READY or n in self._unprobed)
            )

    def unprobed(self, names: Iterable[str]) -> frozenset[str]:
        """Replicas heard READY again that wait for a probe of ours (a re-probe is due at once)."""
        if self._quiet:
            return frozenset()
        now = self._clock()
        with self._lock:
            return frozenset(n for n in names if n in self._unprobed and self._fresh(n, now) is not None)

    def states(self) -> dict[str, str]:
        """Replica name -> the state its host last gave (fresh answers only), for people and tests."""
        now = self._clock()
        with self._lock:
            return {n: h.state for n in self._heard if (h := self._fresh(n, now)) is not None}
