"""One running gateway's worker list kept in step with the control plane, in a thread of its own.

While its gateway is READY, the supervisor runs a :class:`SyncLoop` (which
it asked what is READY before registering the workers, :meth:`SyncLoop.hear`).
Every ``sync_interval_s`` (the first round at once) the loop reads
``GET /status`` of every host of the group
(:func:`~model_server.common.control_status.get_control_status`, several hosts
at once, each within its read timeout), asks the pure
:func:`~model_server.gateway.sync.plan_sync` what to change, and queues the
changes through the gateway's worker API
(:class:`~model_server.gateway.membership.Membership`): removals first, then
additions, with the engines' key and the health settings the table gives.

A host whose control API does not answer leaves its replicas as they are
(logged once, and once more when it answers again); so does a gateway that
does not answer ``GET /workers`` (its supervisor deals with that). The loop
never raises: an error is logged and the next round tries again. It ends with
its gateway: :meth:`SyncLoop.stop` (bounded; the thread is a daemon, and
starts no call after the stop).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from model_server.common.control_status import ControlAnswer, get_control_status
from model_server.common.urls import url_key
from model_server.errors import LaunchError
from model_server.gateway.membership import Membership
from model_server.gateway.settings import ControlSync, GatewaySettings
from model_server.gateway.sync import Job, Member, SyncPlan, plan_sync, wanted
from model_server.launcher.redact import Secret

__all__ = ["CALL_TIMEOUT_S", "SyncLoop"]

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 3.0  # one call of the gateway's worker API (it runs on this machine, or near it)
MAX_READERS = 8  # hosts read at once


def _value(key: str | Secret | None) -> str | None:
    return key.value if isinstance(key, Secret) else key


class SyncLoop:
    """Follows the control plane for one gateway until :meth:`stop`; :meth:`run_round` is one read-plan-apply."""

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        gateway_key: Secret | None = None,
        worker_key: Secret | None = None,
        control_key: Secret | None = None,
        membership: Callable[..., Membership] = Membership,
        read_control: Callable[..., ControlAnswer] = get_control_status,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if settings.control is None:
            raise ValueError(f"gateway {settings.name}: no control API to follow (settings.control is None)")
        self.settings = settings
        self.control: ControlSync = settings.control
        self.jobs: dict[str, Job] = {}
        self._worker_key = worker_key
        self._control_key = _value(control_key)
        self._read_control = read_control
        self._clock = clock
        self._members = membership(
            settings.url, gateway_key, timeout_s=CALL_TIMEOUT_S, key_env=settings.gateway_key_env
        )
        # trust_env=False: an HTTP(S)_PROXY meant for the internet must not carry reads of the pipelines' APIs
        self._http = httpx.Client(timeout=self.control.timeout_s, trust_env=False)
        readers = max(1, min(MAX_READERS, len(self.control.hosts)))
        self._pool = ThreadPoolExecutor(max_workers=readers, thread_name_prefix=f"sync-{settings.name}")
        self._quiet_hosts: dict[str, str] = {}  # host -> why its control API is not heard (logged once)
        self._gateway_problem = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"gateway-sync-{settings.name}", daemon=True)

    def __repr__(self) -> str:
        return f"SyncLoop({self.settings.name!r}, every {self.control.interval_s:g} s)"

    # ---- the thread -------------------------------------------------------------------------------------

    def start(self, given: Iterable[str] = ()) -> SyncLoop:
        """Follow in the thread from now on. ``given``: the workers the gateway got at its start (on its command
        line, or registered by its supervisor): in flight, so the first rounds do not send them again."""
        now = self._clock()
        self.jobs.update({url: Job("add", now) for url in given})
        hosts = ", ".join(self.control.hosts)
        log.info(
            "gateway %s: its workers follow the control plane: the READY replicas of group %s (control API of %s, "
            "every %g s)", self.settings.name, self.settings.group, hosts, self.control.interval_s,
        )  # fmt: skip
        self._thread.start()
        return self

    def stop(self, timeout_s: float | None = None) -> bool:
        """No new call after this; True once the thread has ended (within ``timeout_s``, by default the bound of
        a read and a call). The thread closes its connections as it ends; a loop never started closes them here."""
        self._stop.set()
        if self._thread.ident is None:
            self._close()
            return True
        self._thread.join(self.control.timeout_s + CALL_TIMEOUT_S if timeout_s is None else timeout_s)
        if self._thread.is_alive():
            log.warning("gateway %s: its worker-list sync is still in a call; it ends after it", self.settings.name)
            return False
        return True

    def _close(self) -> None:
        self._members.close()
        self._http.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                started = self._clock()
                try:
                    self.run_round()
                except Exception:  # noqa: BLE001 - a bug here must not end the gateway's sync for good
                    log.exception("gateway %s: worker-list sync round failed", self.settings.name)
                self._stop.wait(max(0.0, self.control.interval_s - (self._clock() - started)))
        finally:
            self._close()

    # ---- one round --------------------------------------------------------------------------------------

    def _read(self, host: str) -> ControlAnswer:
        return self._read_control(host, self.control.launch, self._control_key, self.control.timeout_s, self._http)

    def _read_all(self) -> dict[str, ControlAnswer]:
        futures = {h: self._pool.submit(self._read, h) for h in self.control.hosts}
        return {h: f.result() for h, f in futures.items()}

    def _heard(self, answers: Mapping[str, ControlAnswer]) -> dict[str, str]:
        """Replica name -> state, for the replicas their own host's control API described now."""
        states: dict[str, str] = {}
        for host, answer in answers.items():
            recorded, problem = answer.servers()
            if problem:
                if host not in self._quiet_hosts:
                    log.warning(
                        "gateway %s: the control API of host %s is not heard (%s): its replicas stay in or out of "
                        "the gateway as they are until it answers", self.settings.name, host, problem,
                    )  # fmt: skip
                self._quiet_hosts[host] = problem
                continue
            if self._quiet_hosts.pop(host, None) is not None:
                log.info("gateway %s: the control API of host %s answers again", self.settings.name, host)
            for r in self.control.replicas:
                if r.host == host and r.name in recorded:
                    states[r.name] = recorded[r.name].state
        return states

    def _gateway_trouble(self, err: LaunchError) -> None:
        text = str(err)
        if text != self._gateway_problem:
            log.warning("gateway %s: its worker list could not be synced: %s", self.settings.name, text)
        self._gateway_problem = text

    def hear(self) -> dict[str, tuple[bool, str]]:
        """What the control APIs say now: replica URL -> (should be a worker, why); replicas not heard absent."""
        return wanted(self.control.replicas, self._heard(self._read_all()))

    def run_round(self) -> SyncPlan | None:
        """Read, plan, apply once; the plan (None when nothing was heard, or the gateway did not answer)."""
        want = self.hear()
        if not want or self._stop.is_set():
            return None
        try:
            members = self._members.members()
        except LaunchError as err:
            self._gateway_trouble(err)
            return None
        plan = plan_sync(want, [m.url for m in members], self.jobs, self._clock())
        jobs = dict(plan.jobs)
        listed: dict[Any, Member] = {url_key(m.url): m for m in members}
        failed = False
        for op, urls in (("remove", plan.remove), ("add", plan.add)):
            for url in urls:
                if self._stop.is_set():
                    return plan
                try:
                    if op == "remove":
                        self._members.queue_removal(listed[url_key(url)])
                    else:
                        self._members.queue_add(url, self._worker_key, self.settings.worker_health)
                except LaunchError as err:
                    jobs.pop(url, None)  # sent again next round
                    self._gateway_trouble(err)
                    failed = True
                    continue
                log.info(
                    "gateway %s: %s worker %s (%s)", self.settings.name, "removing" if op == "remove" else "adding",
                    url, plan.why.get(url, ""),
                )  # fmt: skip
        self.jobs = jobs
        if not failed and self._gateway_problem:
            log.info("gateway %s: its worker list syncs again", self.settings.name)
            self._gateway_problem = ""
        return plan
