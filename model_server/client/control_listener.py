"""Reads every host's control API in the background and feeds a :class:`ControlView`.

One daemon thread per host of the table reads ``GET /status`` every
``client.control_refresh_s`` (within a short timeout), never on a request's
path. An answer updates the view; a host that does not answer twice in a row
(no control API, a firewall, a pipeline restarting, a 401/403 without the
key) is forgotten, so the client routes on its own probes there, as it does
without a control plane. One slow answer of a busy pipeline forgets nothing.
The control key (``launch.control_key_env``) is sent when the variable is
set: a pipeline asks for it on reads from other machines.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import httpx

from model_server.client.control_view import ControlView
from model_server.common.control_status import get_control_status, read_timeout_s
from model_server.common.urls import server_url
from model_server.config import ClientPolicy, Fleet

__all__ = ["ControlListener", "control_view_for"]

log = logging.getLogger("model_server.client")

STALE_AFTER_READS = 3  # an answer counts for this many refresh intervals (plus one read's timeout)
FAILED_READS_TO_FORGET = 2  # a host is forgotten after this many failed reads in a row


def control_view_for(fleet: Fleet, policy: ClientPolicy, clock: Callable[[], float]) -> ControlView | None:
    """The view a client keeps of the replicas it sends to itself, or None when the table has no control API,
    the client does not listen, or every group goes through a gateway (which follows the control plane)."""
    direct = {s.name: s.host for s in fleet.servers if s.group not in policy.through_gateway}
    if fleet.launch.control_port is None or policy.control_refresh_s <= 0 or not direct:
        return None
    stale_after_s = STALE_AFTER_READS * policy.control_refresh_s + read_timeout_s(policy.control_refresh_s)
    return ControlView(direct, stale_after_s, clock)


class ControlListener:
    """The background readers of one client; :meth:`stop` ends them (they are daemons: none outlives the process)."""

    def __init__(self, fleet: Fleet, policy: ClientPolicy, view: ControlView) -> None:
        assert fleet.launch.control_port is not None
        self._view = view
        self._refresh_s = policy.control_refresh_s
        self._launch = fleet.launch
        self._key = fleet.launch.control_key(required=False)
        self._timeout_s = read_timeout_s(policy.control_refresh_s)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._listen, args=(host,), name=f"model-server-control-{host}", daemon=True)
            for host in view.hosts
        ]

    def start(self) -> ControlListener:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout_s: float = 0.0) -> None:
        """Ask every reader to end; wait up to ``timeout_s`` in all for them (0: do not wait)."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            left = deadline - time.monotonic()
            if left > 0 and thread.is_alive():
                thread.join(left)

    def _listen(self, host: str) -> None:
        url = server_url(host, self._launch.control_port or 0, "/status")
        reachable: bool | None = None  # None: not asked yet
        failed = 0  # reads that failed in a row
        with httpx.Client(trust_env=False) as http:
            while not self._stop.is_set():
                try:
                    why = self._read(http, host)
                except Exception as err:  # a bug must not end the listening: say so, and go on
                    log.exception("control API of host %s: its answer could not be used", host)
                    why = f"{type(err).__name__}: {err}"
                if why is None:
                    failed = 0
                    if reachable is not True:
                        log.info("control API of host %s answers (%s): routing follows its servers' states", host, url)
                    reachable = True
                else:
                    failed += 1
                    if failed >= FAILED_READS_TO_FORGET:
                        self._view.lost(host)
                        if reachable is not False:
                            log.warning("control API of host %s (%s) is not used: %s; routing on the client's probes",
                                        host, url, why)  # fmt: skip
                        reachable = False
                self._stop.wait(self._refresh_s)

    def _read(self, http: httpx.Client, host: str) -> str | None:
        """One read of ``host``'s status into the view; None, or why it could not be used."""
        answer = get_control_status(host, self._launch, self._key, self._timeout_s, client=http)
        servers, problem = answer.servers()
        if problem:
            return problem
        news = self._view.heard(host, servers)
        for name, state in news.left:
            log.warning("control API of host %s: replica %s is %s, out of rotation", host, name, state)
        for name in news.back:
            log.info("control API of host %s: replica %s is READY again; back in rotation once probed", host, name)
        return None
