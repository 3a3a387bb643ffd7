"""Clients that listen to the control plane, on real processes: a pipeline of three simulated engines.

The client reads the pipeline's ``GET /status`` (every 0.2 s here) and sends
requests only to replicas the pipeline calls READY. Every HTTP request the
client makes goes through a recording transport, so a test can say exactly
which replica got which request when, and compare that with the pipeline's
events file (wall-clock times of every transition).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from _pipeline_runs import Run, all_ready, free_port, local_copy, port_of
from _waiting import wait_for

from model_server.client import ModelServer
from model_server.client.deadline_transport import deadline_transport
from model_server.config import load_fleet

KEY = "control-key-for-the-client-tests-0123456789"
KEY_ENV = "MS_TEST_CLIENT_CONTROL_KEY"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAMES = ["chat-1", "chat-2", "chat-3"]
MESSAGES = [{"role": "user", "content": "hello"}]
REFRESH_S = 0.2
NOTICE_S = 1.5


@dataclass(frozen=True)
class Sent:
    at: float  # wall clock, as the events file
    port: int
    probe: bool


class RecordingTransport(httpx.BaseTransport):
    """The client's own transport, noting every request it sends (time, port, probe or not)."""

    def __init__(self) -> None:
        self._inner = deadline_transport(httpx.Limits(max_connections=64, max_keepalive_connections=32))
        self._lock = threading.Lock()
        self.sent: list[Sent] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content or b"{}") if request.method == "POST" else {}
        with self._lock:
            self.sent.append(Sent(time.time(), request.url.port or 0, body.get("max_tokens") == 1))
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()

    def to(self, port: int, start: float, end: float, *, probes: bool = True) -> list[Sent]:
        with self._lock:
            return [s for s in self.sent if s.port == port and start <= s.at <= end and (probes or not s.probe)]


class Pipeline:
    def __init__(self, run: Run, config: Path, port: int) -> None:
        self.run, self.config = run, config
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def servers(self) -> dict[str, dict]:
        return {s["name"]: s for s in self.api.get("/status").json()["servers"]}

    def events(self) -> list[dict]:
        path = self.run.status_file.parent / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def client(self, transport: httpx.BaseTransport | None = None) -> ModelServer:
        fleet = load_fleet(self.config)
        policy = fleet.client.model_copy(update={"control_refresh_s": REFRESH_S})
        return ModelServer(fleet, policy=policy, transport=transport)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    tmp_path = tmp_path_factory.mktemp("listening")
    port = free_port()
    launch = {
        "control_port": str(port),
        "control_key_env": json.dumps(KEY_ENV),
        "drain_timeout_s": "20",
        "drain_notice_s": str(NOTICE_S),
    }
    config = local_copy(tmp_path, launch=launch)
    args = tuple(a for n in NAMES for a in ("--only", n))
    run = Run(config, tmp_path, args, env={KEY_ENV: KEY})
    try:
        run.wait(all_ready(NAMES), "chat-1..3 READY", 60)
        yield Pipeline(run, config, port)
        assert run.stop() == 0, run.output()
    finally:
        run.cleanup()


def _hears_all_ready(ms: ModelServer) -> None:
    wait_for(lambda: ms.pipeline_states() == dict.fromkeys(NAMES, "READY"), 10, lambda: f"{ms.pipeline_states()}")


def _windows(events: list[dict], name: str, since: float) -> list[tuple[float, float]]:
    """(left READY, READY again) of ``name`` after ``since``, from the events file."""
    windows, left = [], None
    for e in events:
        if e["server"] != name or e["time"] < since:
            continue
        if e["from"] == "READY":
            left = e["time"]
        elif e["to"] == "READY" and left is not None:
            windows.append((left, e["time"]))
            left = None
    return windows


class Load:
    """``threads`` callers sending ``rate`` chats a second in all through ``ms``, until :meth:`stop`."""

    def __init__(self, ms: ModelServer, threads: int, rate: float) -> None:
        self.ms, self.threads, self.period_s = ms, threads, threads / rate
        self.done, self.failures = 0, []
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._pool = ThreadPoolExecutor(threads)
        self._workers: list = []

    def _one_caller(self) -> None:
        while not self._stop.is_set():
            paced = time.monotonic() + self.period_s
            try:
                self.ms.chat("8", MESSAGES, max_tokens=8)
                with self._lock:
                    self.done += 1
            except Exception as err:  # noqa: BLE001 - collected and asserted on
                with self._lock:
                    self.failures.append(err)
            self._stop.wait(max(0.0, paced - time.monotonic()))  # pacing the load, not waiting for a state

    def __enter__(self) -> Load:
        self._workers = [self._pool.submit(self._one_caller) for _ in range(self.threads)]
        return self

    def stop(self) -> None:
        self._stop.set()
        for w in self._workers:
            w.result(timeout=60)

    def __exit__(self, *_exc: object) -> None:
        self.stop()
        self._pool.shutdown(wait=False)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_rolling_restart_under_load_fails_no_request_and_sends_none_to_a_draining_replica(
    pipeline: Pipeline,
) -> None:
    """8 threads at 20 req/s in all through a rollout of group 8 (chat-1..3 drained and restarted one at a time)."""
    transport = RecordingTransport()
    before = pipeline.servers()
    with pipeline.client(transport) as ms:
        ms.warmup(["8"])
        _hears_all_ready(ms)
        started = time.time()
        with Load(ms, threads=8, rate=20.0) as load:
            answer = pipeline.api.post("/groups/8/rollout", headers=AUTH)  # one at a time, READY before next
            assert answer.status_code == 202, answer.text
            rollout = wait_for(
                lambda: (r := pipeline.api.get("/status").json()["rollouts"].get("8")) and r["state"] != "running"
                and r,
                90,
                "the rollout of group 8 to end",
            )  # fmt: skip
            assert rollout["state"] == "done", rollout
            ports = {n: port_of(pipeline.config, n) for n in NAMES}
            wait_for(
                lambda: (
                    all(transport.to(ports[n], started, time.time(), probes=False) for n in NAMES)
                    and all(
                        transport.to(ports[n], back, time.time(), probes=False)
                        for n in NAMES
                        for _left, back in _windows(pipeline.events(), n, started)
                    )
                ),
                30,
                "every replica serving again after its restart",
            )
    after = pipeline.servers()
    assert load.failures == [], load.failures[:3]
    assert all(after[n]["pid"] != before[n]["pid"] for n in NAMES)
    events = pipeline.events()
    for name in NAMES:
        port = port_of(pipeline.config, name)
        (left, back), *more = _windows(events, name, started)
        assert more == [], f"{name} left READY more than once: {more}"
        # From the end of the drain's notice (clients have heard of it by then) until READY: nothing at all,
        # neither a request nor a probe, reached this replica.
        assert transport.to(port, left + NOTICE_S, back) == []
    assert load.done >= 60


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_killed_replica_leaves_the_ready_set_and_gets_no_attempt_while_it_restarts(pipeline: Pipeline) -> None:
    transport = RecordingTransport()
    with pipeline.client(transport) as ms:
        ms.warmup(["8"])
        _hears_all_ready(ms)
        victim = pipeline.servers()["chat-2"]
        port = port_of(pipeline.config, "chat-2")
        killed = time.time()
        os.kill(victim["pid"], signal.SIGKILL)
        # The pipeline sees the exit at once; the view refreshes every 0.2 s (health interval 0.4 s here).
        wait_for(lambda: ms.pipeline_states().get("chat-2", "READY") != "READY", 5, "the client hears chat-2 left")
        heard = time.time()

        def back_and_serving() -> bool:
            now = pipeline.servers()["chat-2"]
            served = transport.to(port, heard, time.time(), probes=False)
            return now["state"] == "READY" and now["pid"] != victim["pid"] and bool(served)

        with Load(ms, threads=4, rate=20.0) as load:  # callers at once: p2c spreads them over every replica
            wait_for(
                back_and_serving,
                45,
                lambda: (
                    f"chat-2 READY again and serving requests: pipeline {pipeline.servers()['chat-2']}, "
                    f"client view {ms.pipeline_states()}, client stats {ms.stats()['8']['chat-2']}"
                ),
                0.05,
            )
        assert load.failures == [], load.failures[:3]
    (left, back), *_ = _windows(pipeline.events(), "chat-2", killed - 1)
    assert heard - killed < 0.4 + REFRESH_S + 2.0  # one health interval + one refresh, with CI slack
    assert transport.to(port, heard, back) == []  # no request and no probe while it restarted
    assert left >= killed - 0.5


@pytest.mark.timeout(60)
def test_an_unreachable_control_api_changes_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No pipeline at the control port: the client routes on its own probes, exactly as without one."""
    from _client_sims import fleet_of, sims_running

    caplog.set_level(logging.WARNING, logger="model_server.client")
    with sims_running(2) as sims:
        fleet = fleet_of({"8": ("completion", [s.port for s in sims])})
        dead = fleet.model_copy(update={"launch": fleet.launch.model_copy(update={"control_port": free_port()})})
        policy = dead.client.model_copy(update={"control_refresh_s": REFRESH_S})
        with ModelServer(dead, policy=policy) as ms:
            ms.warmup()
            wait_for(lambda: any("is not used" in r.getMessage() for r in caplog.records), 10, "the listener giving up")
            replies = [ms.chat("8", MESSAGES, max_tokens=4).choices[0].message.content for _ in range(10)]
            sims[0].kill()
            replies += [ms.chat("8", MESSAGES, max_tokens=4).choices[0].message.content for _ in range(10)]
            assert len(replies) == 20 and all(replies)
            assert ms.pipeline_states() == {}
            assert ms.stats()["8"]["8-1"].successes >= 10  # the survivor took the load after the kill
