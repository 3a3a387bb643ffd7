"""A gateway's worker list, changed through its worker API: add a replica, remove one, list them.

sglang-router 0.3.2's control API (what this module was written against)::

    GET    /workers              {"workers": [{"id", "url", "model_id", "is_healthy", "load", ...}], "total", "stats"}
    POST   /workers              {"url", "api_key"?, "health_check_*"?, ...}
                                 -> 202 {"status": "accepted", "worker_id", "location", "message"}
    GET    /workers/{id}         one worker, with "job_status" {"job_type", "status", "message"} of its last job
    DELETE /workers/{id}         -> 202 (queued), 404 {"code": "WORKER_NOT_FOUND"}, 400 for an id that is not a UUID

(no ``/add_worker`` or ``/remove_worker`` in this version). Both changes are
queued jobs: a worker appears in ``GET /workers`` once the gateway has
reached it (``/health``, then ``/server_info`` and ``/model_info`` for its
model), which it retries while the worker is down, and leaves it once its
removal job ran. So :meth:`Membership.add` and :meth:`Membership.remove`
poll the list until the change shows, with a deadline. Adding a URL that is
already a member returns the member (the gateway would queue a job that fails
with "already exists"); removing one that is not returns False. A worker
re-added after a removal gets a new id: members are known by URL.

The worker API needs the gateway's own key when it has one. The worker's key
(``api_key`` in the POST) is what the gateway sends to that worker.

Errors are :class:`~model_server.errors.LaunchError`, naming the gateway, the
worker and the fix. No key ever appears in one, nor in a repr.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import httpx

from model_server.common.http_failure import describe_http_failure
from model_server.common.urls import bearer_headers, same_url
from model_server.errors import LaunchError
from model_server.gateway.sync import Member, parse_workers
from model_server.launcher.redact import Secret

__all__ = ["Membership"]

POLL_S = 0.1


class Membership:
    """The worker API of the gateway at ``gateway_url`` (``http://host:port``).

    ``api_key`` is the gateway's own key (a str or a :class:`Secret`), or None;
    ``key_env`` the variable it comes from, named in the fix when the gateway refuses it.
    ``transport`` lets a test answer in-process; ``clock`` and ``sleep`` let it
    run the waits without waiting.
    """

    def __init__(
        self,
        gateway_url: str,
        api_key: str | Secret | None = None,
        *,
        timeout_s: float = 5.0,
        key_env: str | None = None,
        poll_s: float = POLL_S,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        key = api_key.value if isinstance(api_key, Secret) else api_key
        self.gateway_url = gateway_url.rstrip("/")
        self._timeout_s = timeout_s
        self._key_env = key_env
        self._client = httpx.Client(
            base_url=self.gateway_url,
            headers=bearer_headers(key),
            timeout=timeout_s,
            transport=transport,
            trust_env=False,  # a proxy of the environment must not carry the worker API's calls (nor its key)
        )
        self._poll_s = poll_s
        self._clock = clock
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"Membership({self.gateway_url})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Membership:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- HTTP ---------------------------------------------------------------------------------------

    def _request(
        self, method: str, path: str, what: str, json: Any = None, ok: Iterable[int] = (200,)
    ) -> httpx.Response:
        try:
            response = self._client.request(method, path, json=json)
        except httpx.HTTPError as err:
            raise LaunchError(
                f"gateway {self.gateway_url}: cannot {what} ({describe_http_failure(err, self._timeout_s)}). "
                "Is the gateway up and listening there?"
            ) from err
        if response.status_code in (401, 403):
            raise LaunchError(
                f"gateway {self.gateway_url}: refused to {what} (status {response.status_code}): its worker API "
                f"needs the gateway's own key. {self._key_fix()}"
            )
        if response.status_code not in set(ok):
            raise LaunchError(
                f"gateway {self.gateway_url}: could not {what}: status {response.status_code}, {response.text[:300]!r}"
            )
        return response

    def _key_fix(self) -> str:
        if self._key_env:
            return f"Export {self._key_env}=<the key the gateway was started with> here"
        return "Set api_key_env in its [[gateways]] entry (or the table's) and export that variable here"

    def _json(self, response: httpx.Response, what: str) -> Any:
        try:
            return response.json()
        except ValueError as err:
            raise LaunchError(
                f"gateway {self.gateway_url}: answered {what} with something that is not JSON: {response.text[:200]!r}"
            ) from err

    # ---- queries ------------------------------------------------------------------------------------

    def members(self) -> tuple[Member, ...]:
        """Every worker the gateway routes to (``GET /workers``)."""
        data = self._json(self._request("GET", "/workers", "list its workers"), "GET /workers")
        members, problem = parse_workers(data)
        if problem:
            raise LaunchError(
                f"gateway {self.gateway_url}: {problem}: {str(data)[:200]!r}. Is that port a sglang-router gateway?"
            )
        return members

    def find(self, url: str) -> Member | None:
        """The member at ``url``, or None."""
        return next((m for m in self.members() if same_url(m.url, url)), None)

    def _job(self, worker_id: str) -> Mapping[str, Any]:
        """The status of the last job on ``worker_id`` ({} if the gateway has none to tell)."""
        response = self._request("GET", f"/workers/{worker_id}", f"read the job of worker {worker_id}", ok=(200, 404))
        if response.status_code == 404:
            return {}
        data = self._json(response, f"GET /workers/{worker_id}")
        job = data.get("job_status") if isinstance(data, dict) else None
        return job if isinstance(job, dict) else {}

    # ---- changes ------------------------------------------------------------------------------------

    def add(
        self,
        url: str,
        *,
        worker_api_key: str | Secret | None = None,
        health: Mapping[str, int] | None = None,
        wait_s: float = 30.0,
        healthy: bool = True,
    ) -> Member | None:
        """Make ``url`` a worker of the gateway; return it once it is listed (and healthy, with ``healthy``).

        ``worker_api_key`` is the key the gateway will send to this worker;
        ``health`` its health-check settings (``health_check_interval_secs``,
        ...), else the worker API's defaults. ``wait_s`` <= 0 queues the
        change and returns None at once. LaunchError if the gateway's job
        fails (the message says why) or the worker is not there in time.
        """
        existing = self.find(url)
        if existing is not None and (existing.healthy or not healthy or wait_s <= 0):
            return existing
        worker_id = existing.id if existing is not None else self.queue_add(url, worker_api_key, health)
        if wait_s <= 0:
            return None
        deadline = self._clock() + wait_s
        while True:
            member = self.find(url)
            if member is not None and (member.healthy or not healthy):
                return member
            job = self._job(worker_id) if worker_id and member is None else {}
            if job.get("job_type") == "AddWorker" and job.get("status") == "failed":
                raise LaunchError(
                    f"gateway {self.gateway_url}: could not add worker {url}: "
                    f"{job.get('message') or 'its job failed'}. "
                    f"Check that the worker answers /health and /server_info there, with the key the table names"
                )
            if self._clock() >= deadline:
                state = (
                    "listed but not healthy"
                    if member is not None
                    else f"not listed (job: {job.get('status', 'unknown')})"
                )
                raise LaunchError(
                    f"gateway {self.gateway_url}: worker {url} is {state} {wait_s:g} s after it was "
                    "added. Is the worker "
                    f"up and answering /health? The gateway keeps trying; call add() again to wait longer"
                )
            self._sleep(self._poll_s)

    def queue_add(
        self, url: str, worker_api_key: str | Secret | None = None, health: Mapping[str, int] | None = None
    ) -> str:
        """``POST /workers`` for ``url`` without looking first or waiting; the id of the queued job's worker."""
        body: dict[str, Any] = {"url": url, **dict(health or {})}
        key = worker_api_key.value if isinstance(worker_api_key, Secret) else worker_api_key
        if key:
            body["api_key"] = key
        response = self._request("POST", "/workers", f"add worker {url}", json=body, ok=(200, 201, 202))
        data = self._json(response, "POST /workers")
        return str(data.get("worker_id", "")) if isinstance(data, dict) else ""

    def queue_removal(self, member: Member) -> None:
        """``DELETE /workers/{id}`` for a member just listed, without waiting (gone already is fine)."""
        self._request("DELETE", f"/workers/{member.id}", f"remove worker {member.url}", ok=(200, 202, 204, 404))

    def remove(self, url: str, *, wait_s: float = 30.0) -> bool:
        """Stop routing to ``url``: True once it has left the list, False if it was not a member.

        Requests already sent to it finish; no new one goes there. ``wait_s``
        <= 0 queues the removal and returns at once.
        """
        member = self.find(url)
        if member is None:
            return False
        self.queue_removal(member)
        if wait_s <= 0:
            return True
        deadline = self._clock() + wait_s
        while self.find(url) is not None:
            if self._clock() >= deadline:
                raise LaunchError(
                    f"gateway {self.gateway_url}: worker {url} is still listed {wait_s:g} s after its "
                    "removal was queued; "
                    f"its log ({member.id}) says why. Call remove() again to wait longer"
                )
            self._sleep(self._poll_s)
        return True

    def ensure(
        self,
        urls: Iterable[str],
        *,
        worker_api_key: str | Secret | None = None,
        health: Mapping[str, int] | None = None,
    ) -> tuple[str, ...]:
        """Queue the addition of every URL of ``urls`` that is not a member; return those queued (no wait)."""
        present = self.members()
        missing = tuple(u for u in urls if not any(same_url(m.url, u) for m in present))
        for url in missing:
            self.queue_add(url, worker_api_key, health)  # the list was just read: no second GET /workers each
        return missing
