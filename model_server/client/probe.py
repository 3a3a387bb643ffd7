"""Latency probes: every replica of a group at once, with a small real request.

A completion replica is asked for one output token of a short chat, an
embedding replica for the embedding of a short text, each under the current
latency bound. The probes run concurrently (threads, or tasks in the async
client), so building a group of N replicas takes about one probe, not N.
A probe answers with its latency, or says why it failed; it never raises for
a replica's fault. Used by the client's build/re-probe, ``client_configs`` and
``model-server probe``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from collections.abc import Collection, Sequence
from typing import Any

import httpx

from model_server.client.replica_group import ProbeResult
from model_server.client.retry import is_retryable_status
from model_server.common.urls import bearer_headers
from model_server.config import ServerKind, ServerSpec

__all__ = [
    "PROBE_TEXT",
    "RoundWatch",
    "aprobe_group",
    "check_probe_answer",
    "probe_group",
    "probe_one",
    "probe_request",
]

PROBE_TEXT = "Reply with one word: ready?"


def probe_request(spec: ServerSpec) -> tuple[str, dict[str, Any]]:
    """(URL, JSON body) of the probe for one replica."""
    if spec.kind is ServerKind.embedding:
        return f"{spec.base_url}/embeddings", {"model": spec.model_name, "input": PROBE_TEXT}
    body = {
        "model": spec.model_name,
        "messages": [{"role": "user", "content": PROBE_TEXT}],
        "max_tokens": 1,
        "temperature": 0.0,
    }
    return f"{spec.base_url}/chat/completions", body


def check_probe_answer(spec: ServerSpec, response: httpx.Response) -> tuple[int | None, str | None]:
    """(output tokens, error): the error says what is wrong with the answer, None if it is good."""
    if is_rejection(response.status_code):
        return None, None
    if response.status_code != 200:
        return None, f"HTTP {response.status_code}: {response.text[:200]}"
    try:
        data = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, f"malformed answer (not JSON: {err})"
    try:
        if spec.kind is ServerKind.embedding:
            vector = data["data"][0]["embedding"]
            if not isinstance(vector, list) or not vector:
                return None, "malformed answer (empty embedding)"
            return None, None
        content = data["choices"][0]["message"]["content"]
        if content is not None and not isinstance(content, str):
            return None, "malformed answer (content is not text)"
        tokens = (data.get("usage") or {}).get("completion_tokens")
        return (tokens if isinstance(tokens, int) and tokens > 0 else 1), None
    except (KeyError, IndexError, TypeError) as err:
        return None, f"malformed answer (missing {err})"


def is_rejection(status: int) -> bool:
    """A 4xx that refuses the request itself (the server is up): see model_server.client.retry."""
    return 400 <= status < 500 and not is_retryable_status(status)


def _result(spec: ServerSpec, response: httpx.Response, elapsed: float, timeout_s: float) -> ProbeResult:
    tokens, error = check_probe_answer(spec, response)
    if error is not None:
        return ProbeResult(spec, None, error=error)
    if elapsed > timeout_s:
        return ProbeResult(spec, None, error=f"too slow: {elapsed:.2f}s > bound {timeout_s:.2f}s", timed_out=True)
    rejected = f"HTTP {response.status_code}: {response.text[:200]}" if is_rejection(response.status_code) else None
    return ProbeResult(spec, elapsed, output_tokens=tokens or 1, rejected=rejected)


def _timeout(timeout_s: float, connect_timeout_s: float) -> httpx.Timeout:
    return httpx.Timeout(timeout_s, connect=min(connect_timeout_s, timeout_s))


def probe_one(
    spec: ServerSpec,
    timeout_s: float,
    *,
    api_key: str | None = None,
    client: httpx.Client | None = None,
    connect_timeout_s: float = 3.0,
) -> ProbeResult:
    """Probe one replica (blocking, at most about ``timeout_s``)."""
    url, body = probe_request(spec)
    own = client is None
    http = client or httpx.Client()
    started = time.monotonic()
    try:
        response = http.post(
            url, json=body, headers=bearer_headers(api_key), timeout=_timeout(timeout_s, connect_timeout_s)
        )
        elapsed = time.monotonic() - started
    except httpx.TimeoutException:
        return ProbeResult(spec, None, error=f"timeout: no answer within {timeout_s:.2f}s", timed_out=True)
    except httpx.HTTPError as err:
        return ProbeResult(spec, None, error=f"connection error: {type(err).__name__}: {err}"[:300])
    finally:
        if own:
            http.close()
    return _result(spec, response, elapsed, timeout_s)


class RoundWatch:
    """When a probe round stops waiting (pure; the clock is the caller's): both probe_group twins ask it.

    The round ends soon after the first good answer (see :func:`round_grace_s`), or once every
    replica but the ``suspects`` (names of replicas that last timed out) has answered: a hung
    replica must not hold every caller waiting on the round for the whole bound. Probes still
    running then come back ``pending`` (nothing learned of them). A ``patient`` round (a
    background re-probe, which no caller waits for) waits for every probe.
    """

    def __init__(
        self,
        specs: Sequence[ServerSpec],
        timeout_s: float,
        connect_timeout_s: float,
        suspects: Collection[str],
        patient: bool,
        now: float,
    ) -> None:
        self.total, self.timeout_s, self.suspects, self.patient = len(specs), timeout_s, suspects, patient
        self.end = now + timeout_s + connect_timeout_s + 1.0  # each probe bounds itself; this bounds the round
        self.early = False

    def left_s(self, now: float) -> float:
        return max(0.0, self.end - now)

    def stop_after(self, finished: Sequence[ProbeResult], waiting: Sequence[ServerSpec], now: float) -> bool:
        """Some probes finished: whether to stop waiting for the others now (the end may move closer too)."""
        if self.patient:
            return False
        good = [r.latency_s for r in finished if r.usable]
        if good and not self.early:
            self.early, self.end = True, min(self.end, now + round_grace_s(min(good)))
        if waiting and _only_suspects(waiting, self.suspects, self.total):
            self.early = True
            return True
        return False

    def unfinished(self, spec: ServerSpec) -> ProbeResult:
        """What a probe still running at the end of the round says."""
        if self.early:
            return ProbeResult(spec, None, error="still probing when the round ended", pending=True)
        return ProbeResult(spec, None, error=f"timeout: no answer within {self.timeout_s:.2f}s", timed_out=True)


def probe_group(
    specs: Sequence[ServerSpec],
    timeout_s: float,
    *,
    api_key: str | None = None,
    client: httpx.Client | None = None,
    connect_timeout_s: float = 3.0,
    suspects: Collection[str] = (),
    patient: bool = False,
) -> list[ProbeResult]:
    """Probe every replica concurrently (threads); results in the order of ``specs``, within about ``timeout_s``.

    The round may end early: see :class:`RoundWatch`.
    """
    if not specs:
        return []
    own = client is None
    http = client or httpx.Client(limits=httpx.Limits(max_connections=max(10, len(specs))))
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(specs), thread_name_prefix="model-server-probe")
    try:
        futures = {
            pool.submit(probe_one, s, timeout_s, api_key=api_key, client=http, connect_timeout_s=connect_timeout_s): s
            for s in specs
        }
        watch = RoundWatch(specs, timeout_s, connect_timeout_s, suspects, patient, time.monotonic())
        waiting = set(futures)
        while waiting:
            done, waiting = concurrent.futures.wait(
                waiting, timeout=watch.left_s(time.monotonic()), return_when=concurrent.futures.FIRST_COMPLETED
            )
            finished = [f.result() for f in futures if f.done()]
            if not done or watch.stop_after(finished, [futures[f] for f in waiting], time.monotonic()):
                break
        return [f.result() if f.done() else watch.unfinished(spec) for f, spec in futures.items()]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        if own:
            http.close()


def _only_suspects(waiting: Sequence[ServerSpec], suspects: Collection[str], total: int) -> bool:
    """Whether the probes still running are all of suspect replicas (while some replica is not one)."""
    return len(suspects) < total and all(s.name in suspects for s in waiting)


def round_grace_s(fastest_s: float | None) -> float:
    """How long a round waits for other replicas once one answered well: as long again, at least 50 ms."""
    return max(0.05, fastest_s or 0.0)


async def _aprobe_one(
    spec: ServerSpec, timeout_s: float, api_key: str | None, client: httpx.AsyncClient, connect_timeout_s: float
) -> ProbeResult:
    url, body = probe_request(spec)
    started = time.monotonic()
    try:
        response = await asyncio.wait_for(
            client.post(
                url, json=body, headers=bearer_headers(api_key), timeout=_timeout(timeout_s, connect_timeout_s)
            ),
            timeout=timeout_s + connect_timeout_s,
        )
        elapsed = time.monotonic() - started
    except (httpx.TimeoutException, asyncio.TimeoutError):
        return ProbeResult(spec, None, error=f"timeout: no answer within {timeout_s:.2f}s", timed_out=True)
    except httpx.HTTPError as err:
        return ProbeResult(spec, None, error=f"connection error: {type(err).__name__}: {err}"[:300])
    return _result(spec, response, elapsed, timeout_s)


async def aprobe_group(
    specs: Sequence[ServerSpec],
    timeout_s: float,
    *,
    api_key: str | None = None,
    client: httpx.AsyncClient | None = None,
    connect_timeout_s: float = 3.0,
    suspects: Collection[str] = (),
    patient: bool = False,
) -> list[ProbeResult]:
    """The asyncio twin of :func:`probe_group`: every replica at once (tasks), results in order, the same early end."""
    if not specs:
        return []
    own = client is None
    http = client or httpx.AsyncClient()
    tasks = {asyncio.ensure_future(_aprobe_one(s, timeout_s, api_key, http, connect_timeout_s)): s for s in specs}
    try:
        loop = asyncio.get_running_loop()
        watch = RoundWatch(specs, timeout_s, connect_timeout_s, suspects, patient, loop.time())
        waiting = set(tasks)
        while waiting:
            done, waiting = await asyncio.wait(
                waiting, timeout=watch.left_s(loop.time()), return_when=asyncio.FIRST_COMPLETED
            )
            finished = [t.result() for t in tasks if t.done()]
            if not done or watch.stop_after(finished, [tasks[t] for t in waiting], loop.time()):
                break
        return [t.result() if t.done() else watch.unfinished(spec) for t, spec in tasks.items()]
    finally:
        for t in tasks:
            t.cancel()
        if own:
            await http.aclose()
