"""The gateway's worker list follows the control plane: a real pipeline, the real SGLang Model Gateway, real load.

One pipeline runs chat-1..3 of a copy of configs/local.toml (group "8", simulated engines that require the
engines' key) with its control API on a free port; `model-server gateway` runs the group's gateway from the
same table, with its own key (so its workers are registered, and re-added, through its worker API) and its
own health checks every 60 s, so that only the control plane can take a replica out within seconds. Load is
~20 chat requests a second through the gateway, sent with the plain openai SDK. Each test leaves every
replica READY and a worker of the gateway.

Skipped, with the reason, where sglang_router is not importable, unless MODEL_SERVER_REQUIRE_GATEWAY=1.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from _pipeline_runs import Run, all_ready, free_port, local_copy
from _waiting import wait_for

from model_server.client import ModelServer
from model_server.client.deadline_transport import deadline_transport
from model_server.common.processes import listening_pid
from model_server.config import ClientPolicy, load_fleet
from model_server.gateway.settings import PINNED_VERSION

ROUTER = importlib.util.find_spec("sglang_router") is not None
REQUIRE = os.environ.get("MODEL_SERVER_REQUIRE_GATEWAY") == "1"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not ROUTER and not REQUIRE,
        reason=(
            f"sglang_router is not importable: pip install 'model-server[gateway]' (sglang-router=={PINNED_VERSION})"
        ),
    ),
]

WORKER_KEY = "sk-engines-sync-4b1d9e7a2c"
GATEWAY_KEY = "sk-gateway-sync-8c3f0a6d1e"
CONTROL_KEY = "control-key-for-the-gateway-sync-tests-0123456789"
KEYS = {"MS_GWS_WORKER_KEY": WORKER_KEY, "MS_GWS_GATEWAY_KEY": GATEWAY_KEY, "MS_GWS_CONTROL_KEY": CONTROL_KEY}
NAMES = ["chat-1", "chat-2", "chat-3"]
GATEWAY = """
[[gateways]]
group = "8"
port = {port}
prometheus_port = {metrics}
policy = "round_robin"
api_key_env = "MS_GWS_GATEWAY_KEY"
liveness_interval_s = 0.5
liveness_timeout_s = 3
startup_timeout_s = 45
restart_backoff_initial_s = 0.1
restart_backoff_max_s = 0.5
health_check_interval_secs = 60  # the gateway's own checks: only the control plane is this quick
sync_interval_s = 1
"""
RATE = 20.0  # requests a second through the gateway
DRAIN_TIMEOUT_S = 20.0
REMOVED_WITHIN_S = 5.0  # the control plane's refresh (1 s) and a busy 2-core machine; the gateway's own: 60 s


@pytest.fixture(scope="module", autouse=True)
def _router_importable() -> None:
    if not ROUTER:  # only with MODEL_SERVER_REQUIRE_GATEWAY=1: the skip above covers the rest
        pytest.fail(f"MODEL_SERVER_REQUIRE_GATEWAY=1 and sglang_router is not importable: pip install "
                    f"sglang-router=={PINNED_VERSION}")  # fmt: skip


@dataclass
class Stack:
    """The pipeline, its control API, the gateway (a `model-server gateway` subprocess) and the replicas' URLs."""

    run: Run
    gateway: subprocess.Popen[bytes]
    gateway_log: Path
    tmp: Path
    port: int
    urls: dict[str, str]
    control: httpx.Client
    workers: httpx.Client
    table: Path

    def servers(self) -> dict[str, dict]:
        return {s["name"]: s for s in self.control.get("/status").json()["servers"]}

    def members(self) -> dict[str, bool] | None:
        """The gateway's workers (URL -> healthy), None while it does not answer."""
        try:
            answer = self.workers.get("/workers")
            return {w["url"]: bool(w["is_healthy"]) for w in answer.json()["workers"]}
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    def left(self, name: str) -> bool:
        """Whether the gateway answers, without ``name`` among its workers (not: whether it does not answer)."""
        members = self.members()
        return members is not None and self.urls[name] not in members

    def all_served(self) -> bool:
        members = self.members() or {}
        return all(members.get(self.urls[n]) for n in NAMES)

    def output(self) -> str:
        logs = "".join(p.read_text(errors="replace") for p in sorted((self.tmp / "logs").glob("gateway-*.log")))
        lines = [ln for ln in logs.splitlines() if "http_request{" not in ln and "smg::workflow" not in ln][-30:]
        return self.gateway_log.read_text(errors="replace")[-5000:] + "\n--- gateway log:\n" + "\n".join(lines)

    def diagnose(self) -> str:
        try:
            states = {n: (s["state"], s["pid"]) for n, s in self.servers().items()}
        except (httpx.HTTPError, ValueError, KeyError) as err:
            states = {"?": repr(err)}
        return f"states {states}; gateway workers {self.members()}\n--- `model-server gateway`:\n{self.output()}"


def _stop_gateway(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - a test failed: leave nothing behind
        proc.kill()
        proc.wait(10)
        return None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("gateway-sync")
    control_port, port, metrics = free_port(), free_port(), free_port()
    assert len({control_port, port, metrics}) == 3
    launch = {
        "control_port": str(control_port),
        "control_key_env": '"MS_GWS_CONTROL_KEY"',
        "drain_timeout_s": f"{DRAIN_TIMEOUT_S:g}",
        "drain_notice_s": "2",  # the default: above the gateway's sync interval (1 s), as `check` requires
    }
    table = local_copy(tmp, launch=launch, top='api_key_env = "MS_GWS_WORKER_KEY"\n',
                       extra=GATEWAY.format(port=port, metrics=metrics))  # fmt: skip
    check = subprocess.run([sys.executable, "-m", "model_server", "check", str(table)], capture_output=True,
                           text=True, timeout=60, env={**os.environ, **KEYS})  # fmt: skip
    said = " ".join(check.stdout.split())  # the console wraps long lines
    assert check.returncode == 0 and "the READY ones per the control APIs, read every 1 s" in said, check
    run = Run(table, tmp, tuple(a for n in NAMES for a in ("--only", n)), env=KEYS)
    gateway_log = tmp / "gateway.out"
    gateway: subprocess.Popen[bytes] | None = None
    try:
        run.wait(all_ready(NAMES), "chat-1..3 READY", 60)
        with open(gateway_log, "wb") as out:
            gateway = subprocess.Popen(
                [sys.executable, "-m", "model_server", "gateway", "--config", str(table)], cwd=tmp, stdout=out,
                stderr=subprocess.STDOUT, env={**os.environ, **KEYS},
            )  # fmt: skip
        control = httpx.Client(base_url=f"http://127.0.0.1:{control_port}", timeout=10)
        urls = {n: f"http://127.0.0.1:{s['port']}" for n, s in
                {s["name"]: s for s in control.get("/status").json()["servers"]}.items()}  # fmt: skip
        workers = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {GATEWAY_KEY}"}, timeout=5
        )
        s = Stack(run, gateway, gateway_log, tmp, port, urls, control, workers, table)
        wait_for(lambda: gateway.poll() is not None or s.all_served(), 60,
                 lambda: f"the gateway READY with chat-1..3 as healthy workers; {s.diagnose()}")  # fmt: skip
        assert gateway.poll() is None, s.output()
        yield s
        assert _stop_gateway(gateway) == 0, s.output()
        text = s.output() + run.output(tail=False)
        assert CONTROL_KEY not in text and GATEWAY_KEY not in text and WORKER_KEY not in text
        assert run.stop() == 0, run.output()
    finally:
        if gateway is not None:
            _stop_gateway(gateway)
        run.cleanup()


@pytest.fixture(autouse=True)
def _all_ready_and_served(stack: Stack) -> None:
    """Each test starts with chat-1..3 READY and healthy workers of the gateway, whatever the one before left."""
    wait_for(lambda: all(stack.servers()[n]["state"] == "READY" for n in NAMES) and stack.all_served(), 45,
             lambda: f"chat-1..3 READY and healthy workers of the gateway before the test; {stack.diagnose()}")  # fmt: skip


class Load:
    """~RATE chat requests a second through the gateway with the plain openai SDK; every outcome recorded."""

    def __init__(self, port: int, rate: float = RATE, max_tokens: int = 4) -> None:
        self.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=20
        )
        self.rate, self.max_tokens = rate, max_tokens
        self.outcomes: list[tuple[float, str | None]] = []  # (sent at, error or None)
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="load")
        self._futures: list[Future[None]] = []
        self._stop = threading.Event()
        self._pacer = threading.Thread(target=self._pace, daemon=True)

    def _one(self, i: int) -> None:
        sent = time.monotonic()
        try:
            reply = self.client.chat.completions.create(
                model="llama-8b", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=self.max_tokens
            )
            error = None if reply.choices and reply.choices[0].message.content else f"an empty reply: {reply}"
        except openai.OpenAIError as err:
            error = f"{type(err).__name__}: {err}"
        self.outcomes.append((sent, error))

    def _pace(self) -> None:
        due, i = time.monotonic(), 0
        while not self._stop.is_set():
            self._futures.append(self._pool.submit(self._one, i))
            i += 1
            due += 1.0 / self.rate
            self._stop.wait(max(0.0, due - time.monotonic()))  # the pace of the load, not a synchronisation

    @property
    def done(self) -> int:
        return len(self.outcomes)

    @property
    def failures(self) -> list[tuple[float, str]]:
        return [(t, e) for t, e in self.outcomes if e is not None]

    def __enter__(self) -> Load:
        self._pacer.start()
        wait_for(lambda: self.done >= 20, 15, "the first 20 requests through the gateway")
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._pacer.join(5)
        for future in self._futures:
            future.result(timeout=30)
        self._pool.shutdown()
        self.client.close()


class Recorder:
    """Samples the pipeline's states and the gateway's workers together, in a thread, as fast as they answer."""

    def __init__(self, s: Stack) -> None:
        self.s = s
        self.samples: list[tuple[float, dict[str, str], dict[str, bool] | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                states = {n: v["state"] for n, v in self.s.servers().items()}
            except (httpx.HTTPError, ValueError, KeyError):
                states = {}
            self.samples.append((t, states, self.s.members()))
            self._stop.wait(0.03)  # the sampling period

    def first(self, name: str, seen: Callable[[str | None, bool | None], bool], after: float) -> float | None:
        """When ``seen(its state, whether it is a worker)`` first held for ``name``, at or after ``after``."""
        url = self.s.urls[name]
        for t, states, members in self.samples:
            if t >= after and seen(states.get(name), None if members is None else url in members):
                return t
        return None

    def __enter__(self) -> Recorder:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the recorder's thread did not end within 10 s"


@pytest.mark.timeout(105)  # 1.5 x its waits (70 s): a wait's own message, not the timeout's, tells what failed
def test_a_killed_replica_leaves_the_gateway_within_the_control_planes_refresh_and_comes_back(stack: Stack) -> None:
    old_pid = stack.servers()["chat-2"]["pid"]
    with Load(stack.port) as load:
        os.kill(old_pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: stack.left("chat-2"), REMOVED_WITHIN_S,
                 lambda: f"chat-2 out of the gateway's workers; {stack.diagnose()}")  # fmt: skip
        removed_s = time.monotonic() - killed
        wait_for(lambda: (s := stack.servers()["chat-2"])["state"] == "READY" and s["pid"] != old_pid, 30,
                 lambda: f"chat-2 READY again; {stack.diagnose()}")  # fmt: skip
        ready = time.monotonic()
        wait_for(lambda: (stack.members() or {}).get(stack.urls["chat-2"]), 10,
                 lambda: f"chat-2 a healthy worker again; {stack.diagnose()}")  # fmt: skip
        back_s = time.monotonic() - ready
        served = load.done
        wait_for(lambda: load.done >= served + 20, 10, "20 more requests, chat-2 among the workers")
    failures = load.failures
    print(
        f"\nkill -9 under {RATE:g} req/s: {load.done} requests, {len(failures)} failed; chat-2 left the gateway "
        f"{removed_s:.2f} s after the kill, was READY again {ready - killed:.2f} s after it and a worker again "
        f"{back_s:.2f} s after that; failures: {[(round(t - killed, 2), e[:120]) for t, e in failures]}"
    )
    assert removed_s < REMOVED_WITHIN_S
    assert len(failures) <= 5, failures  # at most those in flight on chat-2 at the kill: the gateway retries the rest
    assert "removing worker " + stack.urls["chat-2"] + " (chat-2 is " in stack.output()


@pytest.mark.timeout(145)  # 1.5 x its waits (95 s)
def test_a_rollout_through_the_gateway_under_load_fails_no_request(stack: Stack) -> None:
    auth = {"Authorization": f"Bearer {CONTROL_KEY}"}
    # ~0.3 s a request, so ~2 run on each replica at any time: a drained replica that kept getting requests would
    # seldom run none, and would drain until launch.drain_timeout_s (20 s) instead of ~drain_notice_s (2 s)
    with Recorder(stack) as recorder, Load(stack.port, max_tokens=64) as load:
        started = time.monotonic()
        answer = stack.control.post("/groups/8/rollout", headers=auth)
        assert answer.status_code == 202, answer.text
        final = wait_for(
            lambda: (r := stack.control.get("/status").json()["rollouts"].get("8")) and r["state"] != "running" and r,
            60, lambda: f"the rollout to end; {stack.diagnose()}",
        )  # fmt: skip
        took = time.monotonic() - started
        wait_for(stack.all_served, 10, lambda: f"chat-1..3 healthy workers again; {stack.diagnose()}")
        served = load.done
        wait_for(lambda: load.done >= served + 20, 10, "20 more requests after the rollout")
    assert final["state"] == "done" and final["done"] == NAMES, final
    timeline = []
    for name in NAMES:
        draining = recorder.first(name, lambda state, _worker: state == "DRAINING", started)
        assert draining is not None, (name, recorder.samples[-3:])
        out = recorder.first(name, lambda _state, worker: worker is False, started)
        down = recorder.first(name, lambda state, _worker: state not in (None, "READY", "DRAINING"), draining)
        assert out is not None and down is not None, (name, recorder.samples[-3:])
        # out because of the drain (a sample reads the states, then the workers: a removal may fall in between)
        assert draining - 0.2 <= out < down, f"{name}: DRAINING at {draining:.2f}, out {out:.2f}, down {down:.2f}"
        assert down - draining < DRAIN_TIMEOUT_S / 2, f"{name}: drained for {down - draining:.1f} s"
        timeline.append(f"{name}: out {out - draining:.2f} s after DRAINING, {down - out:.2f} s before it stopped "
                        f"(drained {down - draining:.1f} s)")  # fmt: skip
    print(f"\nrollout under {RATE:g} req/s in {took:.1f} s: {load.done} requests, {len(load.failures)} failed; "
          + "; ".join(timeline))  # fmt: skip
    assert load.failures == [], load.failures


@pytest.mark.timeout(135)  # 1.5 x its waits (90 s)
def test_a_restarted_gateway_gets_the_ready_replicas_again_and_no_other(stack: Stack) -> None:
    auth = {"Authorization": f"Bearer {CONTROL_KEY}"}
    assert stack.control.post("/servers/chat-3/stop", headers=auth).status_code == 202
    wait_for(lambda: stack.servers()["chat-3"]["state"] == "STOPPED" and stack.left("chat-3"), 20,
             lambda: f"chat-3 STOPPED and out of the gateway; {stack.diagnose()}")  # fmt: skip
    old = listening_pid(stack.port)
    assert old is not None
    os.kill(old, signal.SIGKILL)  # the gateway process: its supervisor starts a new one, which knows nothing
    wait_for(lambda: (listening_pid(stack.port) or old) != old and stack.members() is not None, 30,
             lambda: f"a new gateway answering; {stack.diagnose()}")  # fmt: skip
    ready = {stack.urls["chat-1"]: True, stack.urls["chat-2"]: True}
    wait_for(lambda: stack.members() == ready, 10, lambda: f"chat-1 and chat-2 only; {stack.diagnose()}")
    output = stack.output()
    assert "READY -> RESTARTING (the gateway exited (killed by signal 9)" in output
    assert "registered 2 worker(s) through POST /workers: " in output and "(not: chat-3 is STOPPED)" in output
    assert stack.control.post("/servers/chat-3/start", headers=auth).status_code == 202
    wait_for(stack.all_served, 30, lambda: f"chat-3 READY and a worker again; {stack.diagnose()}")
    full = stack.gateway_log.read_text(errors="replace")  # all of it: output() is a tail
    killed = "READY -> RESTARTING (the gateway exited (killed by signal 9)"
    assert killed in full, stack.output()
    assert f"adding worker {stack.urls['chat-3']} (chat-3 is READY)" in full.split(killed)[-1], stack.output()


class PortsSeen(httpx.BaseTransport):
    """The client's own transport, noting the port of every request it sends."""

    def __init__(self) -> None:
        self._inner = deadline_transport(httpx.Limits(max_connections=32, max_keepalive_connections=16))
        self.ports: set[int] = set()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.ports.add(request.url.port or 0)
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


@pytest.mark.timeout(120)
def test_model_server_through_the_gateway_rides_out_a_killed_replica(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)
    fleet = load_fleet(stack.table)
    policy = ClientPolicy(**{**fleet.client.model_dump(), "through_gateway": ["8"]})
    transport, outcomes, stop = PortsSeen(), [], threading.Event()

    def caller(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                if n % 4:
                    text = (
                        ms.chat("8", [{"role": "user", "content": f"q {i}-{n}"}], max_tokens=4)
                        .choices[0]
                        .message.content
                    )
                else:
                    text = "".join(ms.stream_chat("8", [{"role": "user", "content": f"s {i}-{n}"}], max_tokens=8))
                outcomes.append(None if text else "an empty reply")
            except Exception as err:  # every failure is counted, none ends the caller
                outcomes.append(f"{type(err).__name__}: {err}")

    old_pid = stack.servers()["chat-1"]["pid"]
    with ModelServer(fleet, policy=policy, transport=transport) as ms:
        threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(4)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: len(outcomes) >= 20, 15, "the first 20 calls through the gateway")
            os.kill(old_pid, signal.SIGKILL)
            wait_for(lambda: (s := stack.servers()["chat-1"])["state"] == "READY" and s["pid"] != old_pid, 30,
                     lambda: f"chat-1 READY again; {stack.diagnose()}")  # fmt: skip
            wait_for(stack.all_served, 10, lambda: f"chat-1 a healthy worker again; {stack.diagnose()}")
            served = len(outcomes)
            wait_for(lambda: len(outcomes) >= served + 20, 10, "20 more calls, chat-1 back among the workers")
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert set(ms.stats()["8"]) == {"gateway-8"}
    failures = [o for o in outcomes if o is not None]
    print(f"\nModelServer through the gateway, chat-1 killed: {len(outcomes)} calls, {len(failures)} failed")
    assert failures == [] and transport.ports == {stack.port}, (failures[:5], transport.ports)
