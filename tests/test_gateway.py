"""The gateway package without a gateway: the [[gateways]] table, settings, command, launcher argument,
membership against an in-process fake of the worker API, the supervisor with fake processes, and the CLI's
--dry-run. Fast: no process is started here (tests/test_gateway_live.py runs the real gateway)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

import model_server.gateway as gateway_pkg
from model_server.common.control_status import ControlAnswer, read_timeout_s
from model_server.common.urls import same_url
from model_server.config import parse_fleet
from model_server.errors import ConfigError, LaunchError
from model_server.gateway import command, launcher, membership, settings, supervisor, sync, sync_loop
from model_server.gateway.membership import Membership
from model_server.gateway.settings import PINNED_VERSION, GatewaySettings
from model_server.gateway.supervisor import GatewayDeps, GatewayKeys, GatewaySupervisor
from model_server.gateway.sync import Job, Member, Replica, plan_sync, wanted
from model_server.gateway.sync_loop import SyncLoop
from model_server.gateway_table import GatewaySpec
from model_server.launcher.lifecycle import ServerState
from model_server.launcher.redact import Secret

SERVERS = """
[[servers]]
name = "chat-1"
group = "8"
kind = "completion"
host = "10.0.0.1"
port = 8001
model = "m"

[[servers]]
name = "chat-2"
group = "8"
kind = "completion"
host = "10.0.0.2"
port = 8001
model = "m"

[[servers]]
name = "embed-1"
group = "7"
kind = "embedding"
host = "10.0.0.1"
port = 8002
model = "e"
"""

POLICY = """
[launch]
health_interval_s = 2.5
health_failures_to_restart = 4
startup_timeout_s = 90
stop_grace_s = 7.5

[client]
max_retry = 6
retry_backoff_initial_ms = 20.5
retry_backoff_max_ms = 900
breaker_failures = 7
breaker_cooldown_s = 12.2
request_timeout_ceiling_s = 45
"""


def fleet_with(gateways: str, top: str = "", policy: str = POLICY):
    return parse_fleet(top + policy + SERVERS + gateways, source="<test>")


def gw(**fields: Any) -> str:
    body = "\n".join(f"{k} = {json.dumps(v)}" for k, v in fields.items())
    return f"\n[[gateways]]\n{body}\n"


# ---- the table --------------------------------------------------------------------------------------


def test_gateway_defaults_come_from_client_and_launch_and_are_recorded() -> None:
    fleet = fleet_with(gw(group="8", port=9000))
    (st,) = settings.validate(fleet)
    r = st.router
    assert (st.name, st.group, st.host, st.port, st.policy) == ("gateway-8", "8", "127.0.0.1", 9000, "cache_aware")
    assert r["retry_max_retries"] == 6 and r["retry_initial_backoff_ms"] == 21 and r["retry_max_backoff_ms"] == 900
    assert r["cb_failure_threshold"] == 7 and r["cb_timeout_duration_secs"] == 13  # whole seconds, rounded up
    assert r["request_timeout_secs"] == 45 and r["worker_startup_timeout_secs"] == 90
    assert r["health_check_interval_secs"] == 3 and r["health_failure_threshold"] == 4
    assert r["shutdown_grace_period_secs"] == 8 and st.stop_grace_s == 7.5
    assert (r["prometheus_host"], r["prometheus_port"]) == ("127.0.0.1", 9001)
    assert st.sources["cb_timeout_duration_secs"] == "[client] breaker_cooldown_s"
    assert st.workers == ("http://10.0.0.1:8001", "http://10.0.0.2:8001")
    assert st.liveness_interval_s == 2.5 and st.liveness_failures_to_restart == 4
    assert st.base_url == "http://127.0.0.1:9000/v1" and st.metrics_url == "http://127.0.0.1:9001/metrics"
    assert st.log_file.endswith("gateway-8.log")


def test_entry_values_win_over_derived_ones_and_a_wildcard_host_is_probed_on_loopback() -> None:
    fleet = fleet_with(
        gw(
            group=7,
            port=9100,
            host="0.0.0.0",
            policy="round_robin",
            retry_max_retries=2,
            cb_timeout_duration_secs=60,
            prometheus_port=9300,
            cache_threshold=0.5,
            name="emb",
        )
    )
    (st,) = settings.validate(fleet)
    assert st.group == "7" and st.name == "emb" and st.policy == "round_robin"
    assert st.router["retry_max_retries"] == 2 and st.router["cb_timeout_duration_secs"] == 60
    assert st.router["prometheus_port"] == 9300 and st.router["cache_threshold"] == 0.5
    assert "retry_max_retries" not in st.sources
    assert st.url == "http://127.0.0.1:9100" and st.log_file.endswith("gateway-emb.log")


def test_a_table_without_gateways_still_parses() -> None:
    assert fleet_with("").gateways == ()


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        (gw(group="8", port=9000, polcy="random"), ["gateways", "polcy", "not a known key"]),
        (gw(group="8", port=70000), ["gateways", "port"]),
        (gw(group="8", port=9000, policy="fastest"), ["gateways", "policy"]),
        (gw(group="8", port=9000, api_key_env="sk-123 456"), ["api_key_env", "NAME of the variable"]),
        (
            gw(group="8", port=9000, retry_initial_backoff_ms=500, retry_max_backoff_ms=100),
            ["retry_initial_backoff_ms", "above"],
        ),
        (gw(group="8", port=9000, health_check_endpoint="health"), ["health_check_endpoint", "path"]),
        (gw(group="8", port=9000, name="a b"), ["name", "log file"]),
    ],
)
def test_bad_entries_are_refused_naming_the_field(entry: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        fleet_with(entry)
    for word in words:
        assert word in str(caught.value)


@pytest.mark.parametrize(
    ("entries", "top", "words"),
    [
        (gw(group="9", port=9000), "", ["group", "'9'", "no such group", "7, 8"]),
        (gw(group="7", port=9000, policy="power_of_two"), "", ["power_of_two", "fewer than 2", "has 1"]),
        (
            gw(group="8", port=9000, policy="power_of_two", api_key_env="G"),
            'api_key_env = "W"\n',
            ["power_of_two", "$G", "$W", "remove its api_key_env"],
        ),
        (
            gw(group="8", port=9000, host="10.0.0.1") + gw(group="7", port=8001, host="10.0.0.1"),
            "",
            ["port", "10.0.0.1:8001", "server 'chat-1'"],
        ),
        (
            gw(group="8", port=9000) + gw(group="7", port=9001),
            "",
            ["gateway-7", "9001", "gateway-8", "prometheus_port"],
        ),
        (gw(group="8", port=9000) + gw(group="8", port=9100), "", ["name", "repeats"]),
        (gw(group="8", port=65535), "", ["prometheus_port", "out of range"]),
        (gw(group="8", port=9000, prometheus_port=9000), "", ["metrics their own port"]),
    ],
)
def test_validation_across_the_table_names_every_problem(entries: str, top: str, words: list[str]) -> None:
    fleet = fleet_with(entries, top=top)
    with pytest.raises(ConfigError) as caught:
        settings.validate(fleet)
    message = str(caught.value)
    assert message.startswith("<test>: invalid [[gateways]]") and "model-server check" in message
    for word in words:
        assert word in message


def test_power_of_two_with_the_engines_key_is_fine() -> None:
    (st,) = settings.validate(fleet_with(gw(group="8", port=9000, policy="power_of_two"), top='api_key_env = "W"\n'))
    assert st.workers_on_command_line and st.gateway_key_env == st.worker_key_env == "W"


def test_keys_decide_how_workers_are_registered() -> None:
    none = settings.validate(fleet_with(gw(group="8", port=9000)))[0]
    same = settings.validate(fleet_with(gw(group="8", port=9000, api_key_env="W"), top='api_key_env = "W"\n'))[0]
    own = settings.validate(fleet_with(gw(group="8", port=9000, api_key_env="G"), top='api_key_env = "W"\n'))[0]
    only_gateway = settings.validate(fleet_with(gw(group="8", port=9000, api_key_env="G")))[0]
    assert none.workers_on_command_line and none.gateway_key_env is None
    assert same.workers_on_command_line
    assert not own.workers_on_command_line and (own.gateway_key_env, own.worker_key_env) == ("G", "W")
    assert only_gateway.workers_on_command_line and only_gateway.worker_key_env is None  # engines take any caller


def test_select_by_group_port_and_the_errors_that_name_the_fix() -> None:
    fleet = fleet_with(gw(group="8", port=9000) + gw(group="7", port=9100))
    assert [s.name for s in settings.select(fleet)] == ["gateway-8", "gateway-7"]
    assert [s.port for s in settings.select(fleet, ["7"], port=9500)] == [9500]
    with pytest.raises(ConfigError, match="--group 9 names no group"):
        settings.select(fleet, ["9"])
    with pytest.raises(ConfigError, match="sets the port of one gateway, and 2 are selected"):
        settings.select(fleet, port=9500)
    bare = fleet_with("")
    with pytest.raises(ConfigError, match=r"no \[\[gateways\]\] section"):
        settings.select(bare)
    with pytest.raises(ConfigError, match="pass --port"):
        settings.select(bare, ["8"])
    (default,) = settings.select(bare, ["8"], port=9700)
    assert (default.name, default.port, default.policy) == ("gateway-8", 9700, "cache_aware")


def test_each_gateway_reads_its_own_key_and_an_unset_one_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    fleet = fleet_with(
        gw(group="8", port=9000, api_key_env="G_TEST") + gw(group="7", port=9100), top='api_key_env = "W_TEST"\n'
    )
    sts = settings.validate(fleet)
    monkeypatch.setenv("W_TEST", "w-value")
    monkeypatch.delenv("G_TEST", raising=False)
    with pytest.raises(ConfigError, match="gateway 'gateway-8' takes its key from the variable G_TEST, which is unset"):
        supervisor.read_keys(fleet, sts)
    monkeypatch.setenv("G_TEST", "g-value")
    keys = supervisor.read_keys(fleet, sts)
    assert keys["gateway-8"].gateway.value == "g-value" and keys["gateway-8"].worker.value == "w-value"
    assert keys["gateway-7"].gateway.value == "w-value"  # by default, the engines' key
    assert "g-value" not in repr(keys) and "w-value" not in repr(keys)
    line = sts[0].summary()
    assert "gateway gateway-8: group 8 on http://127.0.0.1:9000/v1 (cache_aware), 2 worker(s)" in line
    assert "through its worker API" in line and "$G_TEST" in line


# ---- the command and the launcher's argument ------------------------------------------------------------


def _settings(**over: Any) -> GatewaySettings:
    top = 'api_key_env = "W"\n' if over.pop("keyed", False) else ""
    return settings.validate(fleet_with(gw(group="8", port=9000, **over), top=top))[0]


def test_the_command_carries_settings_and_variable_names_never_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("W", "sk-engines-0123456789")
    monkeypatch.setenv("G", "sk-gateway-0123456789")
    st = _settings(keyed=True, api_key_env="G")
    cmd = command.build_command(st, python="/py")
    assert cmd.argv[:3] == ("/py", "-m", "model_server.gateway.launcher") and len(cmd.argv) == 4
    assert "sk-" not in cmd.render()
    data = command.parse_payload(cmd.argv[3])
    assert data["api_key_env"] == "G" and data["router"]["worker_urls"] == []  # registered through the API
    assert command.router_args(data, "sk-gateway-0123456789")["api_key"] == "sk-gateway-0123456789"
    same = command.parse_payload(command.build_command(_settings(keyed=True)).argv[3])
    assert same["router"]["worker_urls"] == ["http://10.0.0.1:8001", "http://10.0.0.2:8001"]


@pytest.mark.parametrize(
    "text", ["not json", "[]", '{"v": 9, "router": {}}', '{"v": 1, "router": {}, "api_key_env": 3}']
)
def test_a_bad_launcher_argument_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        command.parse_payload(text)


def test_a_payload_carrying_a_key_is_refused() -> None:
    with pytest.raises(ValueError, match="never travels on a command line"):
        command.router_args({"router": {"api_key": "x"}}, None)


def test_launcher_exits_2_with_a_reason_before_starting_anything(monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.delenv("GW_TEST_KEY", raising=False)
    assert launcher.main([]) == 2
    assert launcher.main(["{"]) == 2
    data = command.payload(_settings(api_key_env="GW_TEST_KEY"))
    assert launcher.main([json.dumps(data)]) == 2
    assert "GW_TEST_KEY that holds its API key is unset" in caplog.text


ROUTER = importlib.util.find_spec("sglang_router") is not None
REQUIRE = os.environ.get("MODEL_SERVER_REQUIRE_GATEWAY") == "1"
needs_router = pytest.mark.skipif(
    not ROUTER and not REQUIRE,
    reason=f"sglang_router is not importable: pip install 'model-server[gateway]' (sglang-router=={PINNED_VERSION})",
)


@needs_router
def test_every_setting_is_a_field_of_the_pinned_routers_router_args() -> None:
    from sglang_router.router_args import RouterArgs
    from sglang_router.version import __version__

    assert __version__ == PINNED_VERSION
    st = _settings(
        policy="round_robin",
        cache_threshold=0.4,
        cb_window_duration_secs=30,
        queue_size=5,
        queue_timeout_secs=3,
        health_check_timeout_secs=2,
        health_success_threshold=1,
        retry_jitter_factor=0.1,
    )
    kwargs = command.router_args(command.payload(st), "k")
    args = RouterArgs(**kwargs)  # a TypeError if a name is not a field
    assert args.api_key == "k" and args.policy == "round_robin" and args.prometheus_port == 9001


# ---- membership against a fake worker API ---------------------------------------------------------------


@dataclass
class FakeGateway:
    """The worker API of sglang-router 0.3.2, in memory: additions show after `delay` polls of GET /workers."""

    key: str | None = "gw-key"
    delay: int = 2
    fail_url: str | None = None
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    pending: dict[str, list[Any]] = field(default_factory=dict)  # id -> [url, polls left, body]
    removing: dict[str, int] = field(default_factory=dict)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    seen_auth: list[str | None] = field(default_factory=list)
    count: int = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen_auth.append(request.headers.get("authorization"))
        if self.key and request.headers.get("authorization") != f"Bearer {self.key}":
            return httpx.Response(401, json={"error": "Unauthorized"})
        path, method = request.url.path, request.method
        if path == "/workers" and method == "GET":
            self._tick()
            return httpx.Response(200, json={"workers": list(self.workers.values()), "total": len(self.workers)})
        if path == "/workers" and method == "POST":
            body = json.loads(request.content)
            self.bodies.append(body)
            self.count += 1
            wid = f"00000000-0000-0000-0000-{self.count:012d}"
            self.pending[wid] = [body["url"], self.delay]
            return httpx.Response(202, json={"status": "accepted", "worker_id": wid})
        wid = path.rsplit("/", 1)[-1]
        if method == "GET":
            if wid in self.pending and self.pending[wid][0] == self.fail_url:
                return httpx.Response(
                    200,
                    json={
                        "id": wid,
                        "job_status": {
                            "job_type": "AddWorker",
                            "status": "failed",
                            "message": "Workflow failed at step detect_connection_mode",
                        },
                    },
                )
            if wid in self.workers or wid in self.pending:
                return httpx.Response(
                    200, json={"id": wid, "job_status": {"job_type": "AddWorker", "status": "processing"}}
                )
            return httpx.Response(404, json={"error": "not found", "code": "WORKER_NOT_FOUND"})
        if method == "DELETE":
            if wid not in self.workers:
                return httpx.Response(404, json={"error": "not found", "code": "WORKER_NOT_FOUND"})
            self.removing[wid] = self.delay
            return httpx.Response(202, json={"status": "accepted", "worker_id": wid})
        return httpx.Response(404)

    def _tick(self) -> None:
        for wid, job in list(self.pending.items()):
            if job[0] == self.fail_url:
                continue
            job[1] -= 1
            if job[1] <= 0:
                del self.pending[wid]
                self.workers[wid] = {"id": wid, "url": job[0], "model_id": "m", "is_healthy": True, "load": 0}
        for wid in list(self.removing):
            self.removing[wid] -= 1
            if self.removing[wid] <= 0:
                del self.removing[wid]
                self.workers.pop(wid, None)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def members_of(fake: FakeGateway, key: str | Secret | None = "gw-key") -> tuple[Membership, FakeClock]:
    clock = FakeClock()
    return Membership("http://gw:1/", key, transport=httpx.MockTransport(fake), clock=clock, sleep=clock.sleep), clock


def test_add_waits_until_listed_then_is_idempotent_and_remove_waits_until_gone() -> None:
    fake = FakeGateway()
    m, clock = members_of(fake, Secret("gw-key"))
    added = m.add("http://10.0.0.1:8001", worker_api_key=Secret("w-key"), health={"health_check_interval_secs": 3})
    assert isinstance(added, Member) and added.healthy and added.url == "http://10.0.0.1:8001"
    assert fake.bodies == [{"url": "http://10.0.0.1:8001", "api_key": "w-key", "health_check_interval_secs": 3}]
    assert clock.now > 0  # it polled
    assert m.add("HTTP://10.0.0.1:8001/") == added and len(fake.bodies) == 1  # a member already: no second job
    assert m.remove("http://10.0.0.1:8001") is True
    assert m.find("http://10.0.0.1:8001") is None and m.members() == ()
    assert m.remove("http://10.0.0.1:8001") is False
    again = m.add("http://10.0.0.1:8001")
    assert again is not None and again.id != added.id  # a new id after a removal
    assert set(fake.seen_auth) == {"Bearer gw-key"}
    assert "gw-key" not in repr(m) and "w-key" not in repr(m)


def test_a_failed_job_and_a_deadline_are_errors_naming_the_worker() -> None:
    fake = FakeGateway(fail_url="http://dead:1")
    m, _clock = members_of(fake)
    with pytest.raises(LaunchError, match="could not add worker http://dead:1: Workflow failed"):
        m.add("http://dead:1")
    slow = FakeGateway(delay=10**6)
    m2, clock = members_of(slow)
    with pytest.raises(LaunchError, match=r"not listed \(job: processing\) 2 s after it was added"):
        m2.add("http://10.0.0.9:1", wait_s=2)
    assert 2 <= clock.now < 2.5
    assert m2.add("http://10.0.0.8:1", wait_s=0) is None  # queued, not waited for


def test_a_wrong_key_and_an_unreachable_gateway_are_explained() -> None:
    m, _ = members_of(FakeGateway(), key="wrong")
    with pytest.raises(LaunchError, match="needs the gateway's own key. Set api_key_env in its"):
        m.members()
    named = Membership("http://gw:1", "wrong", key_env="MS_GW_KEY", transport=httpx.MockTransport(FakeGateway()))
    with pytest.raises(LaunchError, match="Export MS_GW_KEY=<the key the gateway was started with> here"):
        named.members()

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    m2 = Membership("http://gw:1", transport=httpx.MockTransport(refuse))
    with pytest.raises(LaunchError, match=r"\(connection refused: nothing listens there\)\. Is the gateway up"):
        m2.members()


def test_ensure_queues_only_the_missing_workers_reading_the_list_once() -> None:
    fake = FakeGateway(delay=1)
    m, _ = members_of(fake)
    m.add("http://a:1")
    reads = len(fake.seen_auth)
    assert m.ensure(["http://a:1", "http://b:1", "http://c:1"], worker_api_key="w") == ("http://b:1", "http://c:1")
    assert [b["url"] for b in fake.bodies] == ["http://a:1", "http://b:1", "http://c:1"]
    assert len(fake.seen_auth) - reads == 3  # one GET /workers, then a POST per missing worker


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"total": 1}, 'no "workers" list'),
        ({"workers": ["http://a:1"]}, "no url in workers[0]"),
        ({"workers": [{"url": ""}]}, "no url in workers[0]"),
    ],
)
def test_a_worker_list_the_gateway_garbles_is_an_error_saying_what_is_wrong(data: Any, problem: str) -> None:
    def garbled(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=data)

    m = Membership("http://gw:1", transport=httpx.MockTransport(garbled))
    with pytest.raises(LaunchError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        m.members()


def test_a_worker_is_healthy_only_when_the_gateway_says_true() -> None:
    fake = FakeGateway()
    fake.workers = {"w1": {"id": "w1", "url": "http://a:1", "is_healthy": "false", "load": "?"}}
    (member,) = members_of(fake)[0].members()
    assert member == Member("w1", "http://a:1", "", False, 0)


def test_same_url() -> None:
    assert same_url("http://Host:80/", "http://host:80")
    assert not same_url("http://host:80", "http://host:81")


# ---- the supervisor with fake processes --------------------------------------------------------------


class FakeProc:
    def __init__(self, pid: int, exits_after_polls: int | None) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._left = exits_after_polls

    def poll(self) -> int | None:
        if self.returncode is None and self._left is not None:
            self._left -= 1
            if self._left <= 0:
                self.returncode = 1
        return self.returncode


@dataclass
class World:
    lifetimes: list[int | None]  # per spawn: polls until it exits (None: never)
    busy: bool = False
    spawned: list[Any] = field(default_factory=list)
    killed: list[int] = field(default_factory=list)
    ensured: list[tuple] = field(default_factory=list)
    now: float = 0.0

    def deps(self) -> GatewayDeps:
        world = self

        class Members:
            def __init__(self, url: str, key: Any, timeout_s: float, key_env: str | None = None) -> None:
                self.url, self.key = url, key

            def __enter__(self):
                return self

            def __exit__(self, *exc: object) -> None:
                pass

            def ensure(self, urls, worker_api_key=None, health=None):
                world.ensured.append((self.url, self.key, tuple(urls), worker_api_key, dict(health or {})))
                return tuple(urls)

        def spawn(cmd, log_file, drop_env, redactor=None, tag=None):
            world.spawned.append((cmd, drop_env, tag))
            return FakeProc(100 + len(world.spawned), self.lifetimes[min(len(world.spawned), len(self.lifetimes)) - 1])

        def clock() -> float:
            world.now += 0.01
            return world.now

        return GatewayDeps(
            spawn=spawn, kill_groups=lambda pids, grace, reap=(), tags=None: world.killed.extend(pids) or [],
            probe=lambda url, timeout: (True, ""), port_in_use=lambda h, p: world.busy,
            port_holder=lambda h, p: "pid 42 (nginx)", membership=Members, clock=clock, rand=lambda: 0.0,
        )  # fmt: skip


def _fast(**over: Any) -> GatewaySettings:
    base = dict(
        restart_backoff_initial_s=0.0,
        restart_backoff_max_s=0.0,
        max_restarts=2,
        restart_window_s=100.0,
        liveness_interval_s=0.01,
    )
    base.update(over)
    return _settings(**base)


def test_a_crash_looping_gateway_is_restarted_with_backoff_then_failed() -> None:
    world = World(lifetimes=[3, 3, 3, 3])
    sup = GatewaySupervisor(_fast(), GatewayKeys(), world.deps())
    assert sup.run() is ServerState.FAILED
    assert len(world.spawned) == 3 and world.killed == [101, 102, 103]
    assert "crash loop" in sup.last_error and "max_restarts is 2" in sup.last_error and sup.restarts == 2


def test_a_port_taken_at_the_first_start_is_refused_naming_the_holder() -> None:
    world = World(lifetimes=[None], busy=True)
    sup = GatewaySupervisor(_fast(), GatewayKeys(), world.deps())
    assert sup.run() is ServerState.FAILED and world.spawned == []
    assert "port 9000 on 127.0.0.1 is already in use by another process (pid 42 (nginx))" in sup.last_error


def test_workers_with_their_own_key_are_registered_after_the_gateway_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    world = World(lifetimes=[4, None])
    st = _fast(keyed=True, api_key_env="G")
    keys = GatewayKeys(worker=Secret("w-secret-value"), gateway=Secret("g-secret-value"))
    sup = GatewaySupervisor(st, keys, world.deps(), tag="gateway/1/x/gateway-8")
    done: list[ServerState] = []

    thread = threading.Thread(target=lambda: done.append(sup.run()))
    thread.start()
    from _waiting import wait_for

    wait_for(
        lambda: len(world.ensured) >= 2 and sup.state is ServerState.READY, 10, "a restart and a second registration"
    )
    proc = sup.request_stop()
    thread.join(10)
    assert done == [ServerState.STOPPED] and proc is not None
    url, key, urls, worker_key, health = world.ensured[0]
    assert url == "http://127.0.0.1:9000" and key.value == "g-secret-value" and worker_key.value == "w-secret-value"
    assert urls == st.workers and health == dict(st.worker_health)
    cmd, drop_env, tag = world.spawned[0]
    assert drop_env == ("W",) and tag == "gateway/1/x/gateway-8"  # the launcher never gets the engines' key
    assert "secret" not in cmd.render()


# ---- the worker list follows the control plane: the pure plan ------------------------------------------------

A, B, C = "http://10.0.0.1:8001", "http://10.0.0.2:8001", "http://10.0.0.3:8001"
REPLICAS = (Replica("chat-1", "10.0.0.1", A), Replica("chat-2", "10.0.0.2", B), Replica("chat-3", "10.0.0.3", C))


def test_wanted_keeps_the_ready_replicas_and_says_nothing_of_those_not_heard() -> None:
    want = wanted(REPLICAS, {"chat-1": "READY", "chat-2": "DRAINING", "other": "READY"})
    assert want == {A: (True, "chat-1 is READY"), B: (False, "chat-2 is DRAINING")}  # chat-3: not heard


@pytest.mark.parametrize("state", ["DRAINING", "RESTARTING", "STARTING", "WAITING_GPU", "FAILED", "STOPPED"])
def test_a_replica_that_is_not_ready_leaves_and_comes_back_once_ready(state: str) -> None:
    plan = plan_sync(wanted(REPLICAS, {"chat-1": state, "chat-2": "READY"}), [A, B, C])
    assert (plan.add, plan.remove) == ((), (A,)) and plan.why[A] == f"chat-1 is {state}"
    assert plan.jobs == {A: Job("remove", 0.0)}
    back = plan_sync(wanted(REPLICAS, {"chat-1": "READY"}), [B, C], plan.jobs, now=1.0)
    assert (back.add, back.remove) == ((A,), ()) and back.jobs == {A: Job("add", 1.0)}


def test_replicas_not_heard_and_workers_not_of_the_group_are_left_as_they_are() -> None:
    stranger = "http://10.9.9.9:1"
    plan = plan_sync(wanted(REPLICAS, {}), [A, stranger])  # the control plane is down: nothing changes
    assert plan.empty and plan.jobs == {}
    plan = plan_sync(wanted(REPLICAS, {"chat-1": "READY", "chat-2": "READY"}), [A, stranger])
    assert plan.add == (B,) and plan.remove == ()  # chat-3 not heard: not added; the stranger stays


def test_urls_compare_as_the_gateway_spells_them_and_removals_come_first() -> None:
    plan = plan_sync(
        wanted(REPLICAS, {"chat-1": "READY", "chat-2": "STOPPED", "chat-3": "DRAINING"}),
        ["HTTP://10.0.0.1:8001/", "http://10.0.0.2:8001/", "http://10.0.0.3:8001"],
    )
    assert plan.add == () and plan.remove == (B, C)  # the table's spelling, for the member lookup and the jobs


def test_a_change_in_flight_is_not_sent_again_until_its_patience_ends() -> None:
    want = wanted(REPLICAS, {"chat-1": "READY"})
    first = plan_sync(want, [], now=0.0, patience_s=10.0)
    assert first.add == (A,)
    for t in (0.5, 9.9):
        waiting = plan_sync(want, [], first.jobs, now=t, patience_s=10.0)
        assert waiting.empty and waiting.jobs == {A: Job("add", 0.0)}
    again = plan_sync(want, [], first.jobs, now=10.0, patience_s=10.0)
    assert again.add == (A,) and again.jobs == {A: Job("add", 10.0)}
    shown = plan_sync(want, [A], first.jobs, now=1.0)
    assert shown.empty and shown.jobs == {}  # done
    moot = plan_sync(wanted(REPLICAS, {"chat-1": "DRAINING"}), [], first.jobs, now=1.0)
    assert moot.empty and moot.jobs == {}  # no longer wanted, not listed: nothing to do
    removing = plan_sync(wanted(REPLICAS, {"chat-1": "FAILED"}), [A], {A: Job("remove", 0.0)}, now=1.0)
    assert removing.empty and removing.jobs == {A: Job("remove", 0.0)}


def test_a_job_of_a_replica_not_heard_stays_until_it_shows_or_its_patience_ends() -> None:
    jobs = {A: Job("add", 0.0), B: Job("remove", 0.0)}
    kept = plan_sync({}, [B], jobs, now=1.0, patience_s=10.0)
    assert kept.empty and kept.jobs == jobs
    assert plan_sync({}, [A], jobs, now=1.0).jobs == {}  # A shows, B is gone: both done
    assert plan_sync({}, [B], jobs, now=11.0, patience_s=10.0).jobs == {}  # expired: a later round decides


# ---- the worker list: settings -----------------------------------------------------------------------------

CONTROL = POLICY.replace("[launch]\n", "[launch]\ncontrol_port = 9700\ndrain_notice_s = 2\n")


def test_with_a_control_port_the_workers_follow_the_control_plane() -> None:
    (st,) = settings.validate(fleet_with(gw(group="8", port=9000), policy=CONTROL))
    assert st.control is not None and st.control.interval_s == 1.0 and st.control.timeout_s == 1.0
    assert st.control.replicas == (
        Replica("chat-1", "10.0.0.1", "http://10.0.0.1:8001"),
        Replica("chat-2", "10.0.0.2", "http://10.0.0.2:8001"),
    )
    assert st.control.hosts == ("10.0.0.1", "10.0.0.2") and st.control.launch.control_port == 9700
    assert "the READY ones per the control APIs, read every 1 s" in st.summary()
    follows = st.describe()["worker_list"]["follows_the_control_plane"]
    assert follows["control_apis"] == ["http://10.0.0.1:9700/status", "http://10.0.0.2:9700/status"]
    (off,) = settings.validate(fleet_with(gw(group="8", port=9000, sync_interval_s=0), policy=CONTROL))
    assert off.control is None and "static" in off.summary() and off.describe()["worker_list"].startswith("static")
    (bare,) = settings.validate(fleet_with(gw(group="8", port=9000)))
    assert bare.control is None  # no control API: the table's static list, as before
    assert st.control.timeout_s == read_timeout_s(st.control.interval_s)  # the one rule, in common
    assert read_timeout_s(0.2) == 1.0 and read_timeout_s(30) == 5.0


@pytest.mark.parametrize(
    ("entry", "policy", "words"),
    [
        (gw(group="8", port=9000, sync_interval_s=2), POLICY, ["sync_interval_s", "no launch.control_port"]),
        (gw(group="8", port=9000, sync_interval_s=2), CONTROL, ["sync_interval_s' is 2 s", "drain_notice_s (2 s)"]),
        (gw(group="8", port=9700, host="10.0.0.1"), CONTROL, ["10.0.0.1:9700", "the control API of host 10.0.0.1"]),
    ],
)
def test_check_refuses_a_sync_that_cannot_work(entry: str, policy: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        settings.validate(fleet_with(entry, policy=policy))
    for word in words:
        assert word in str(caught.value)


def test_a_sync_interval_below_a_tenth_of_a_second_is_refused() -> None:
    with pytest.raises(ConfigError, match="sync_interval_s is 0.05"):
        fleet_with(gw(group="8", port=9000, sync_interval_s=0.05), policy=CONTROL)


# ---- the worker list: one round of the loop, against fakes ---------------------------------------------------


@dataclass
class FakeControl:
    """The pipelines' GET /status, by host: a list of (name, state), or a problem (the API does not answer)."""

    hosts: dict[str, Any]
    reads: list[tuple[str, str | None]] = field(default_factory=list)

    def __call__(self, host, policy, key, timeout_s, client=None) -> ControlAnswer:
        self.reads.append((host, key))
        url = f"http://{host}:{policy.control_port}/status"
        answer = self.hosts.get(host)
        if isinstance(answer, str):
            return ControlAnswer(url, problem=answer)
        return ControlAnswer(url, {"servers": [{"name": n, "state": st, "pid": 1} for n, st in answer or ()]})


def sync_of(fake: FakeGateway, control: FakeControl, **kwargs: Any) -> SyncLoop:
    (st,) = settings.validate(fleet_with(gw(group="8", port=9000), policy=CONTROL))
    clock = FakeClock()

    def members(url: str, key: Any, timeout_s: float, key_env: str | None = None) -> Membership:
        return Membership(url, key, timeout_s=timeout_s, key_env=key_env, transport=httpx.MockTransport(fake),
                          clock=clock, sleep=clock.sleep)  # fmt: skip

    return SyncLoop(st, membership=members, read_control=control, clock=clock, **kwargs)


def listed(fake: FakeGateway) -> list[str]:
    return sorted(w["url"] for w in fake.workers.values())


def test_a_round_removes_what_is_not_ready_and_adds_what_is_with_the_engines_key(caplog) -> None:
    fake = FakeGateway(key="gw-key", delay=1)
    fake.workers = {"w1": {"id": "w1", "url": "http://10.0.0.1:8001", "is_healthy": True}}
    control = FakeControl({"10.0.0.1": [("chat-1", "DRAINING")], "10.0.0.2": [("chat-2", "READY")]})
    loop = sync_of(fake, control, gateway_key=Secret("gw-key"), worker_key=Secret("w-key"), control_key=Secret("c"))
    caplog.set_level("INFO")
    plan = loop.run_round()
    assert plan is not None and plan.remove == ("http://10.0.0.1:8001",) and plan.add == ("http://10.0.0.2:8001",)
    assert fake.bodies == [{"url": "http://10.0.0.2:8001", "api_key": "w-key", **loop.settings.worker_health}]
    assert sorted(control.reads) == [("10.0.0.1", "c"), ("10.0.0.2", "c")]  # the control key, to every host
    assert "removing worker http://10.0.0.1:8001 (chat-1 is DRAINING)" in caplog.text
    assert "adding worker http://10.0.0.2:8001 (chat-2 is READY)" in caplog.text
    settled = loop.run_round()  # the fake runs both jobs on this round's GET /workers
    assert listed(fake) == ["http://10.0.0.2:8001"]
    assert settled is not None and settled.empty and len(fake.bodies) == 1 and loop.jobs == {}
    loop.stop()
    assert "w-key" not in caplog.text and "gw-key" not in caplog.text


def test_a_control_api_that_does_not_answer_changes_nothing_and_is_logged_once(caplog) -> None:
    fake = FakeGateway(key=None, delay=1)
    fake.workers = {"w1": {"id": "w1", "url": "http://10.0.0.1:8001", "is_healthy": False}}
    control = FakeControl({"10.0.0.1": "nothing listens at http://10.0.0.1:9700/status", "10.0.0.2": []})
    loop = sync_of(fake, control)
    caplog.set_level("INFO")
    for _ in range(3):
        assert loop.run_round() is None  # nothing heard of chat-1 or chat-2 (host 2 does not list it)
    assert listed(fake) == ["http://10.0.0.1:8001"] and fake.bodies == []
    assert caplog.text.count("the control API of host 10.0.0.1 is not heard") == 1
    control.hosts["10.0.0.1"] = [("chat-1", "STOPPED")]
    plan = loop.run_round()
    assert plan is not None and plan.remove == ("http://10.0.0.1:8001",)
    assert "the control API of host 10.0.0.1 answers again" in caplog.text
    loop.stop()


def test_the_workers_given_at_start_are_not_sent_twice_and_a_gateway_down_is_logged_once(caplog) -> None:
    fake = FakeGateway(key=None, delay=3)
    control = FakeControl({"10.0.0.1": [("chat-1", "READY")], "10.0.0.2": [("chat-2", "READY")]})
    loop = sync_of(fake, control)
    loop.jobs = {"http://10.0.0.1:8001": Job("add", 0.0)}  # as start(given=...) leaves them
    plan = loop.run_round()
    assert plan is not None and plan.add == ("http://10.0.0.2:8001",)  # chat-1 was given at start: in flight
    loop.stop()

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    down = sync_of(refuse, control)  # type: ignore[arg-type]
    caplog.set_level("INFO")
    assert down.run_round() is None and down.run_round() is None
    assert caplog.text.count("its worker list could not be synced") == 1
    down.stop()


def test_the_supervisor_follows_the_control_plane_while_ready_and_stops_the_sync_with_the_gateway() -> None:
    from _waiting import wait_for

    fake = FakeGateway(key=None, delay=1)
    control = FakeControl({"10.0.0.1": [("chat-1", "READY")], "10.0.0.2": [("chat-2", "RESTARTING")]})
    world = World(lifetimes=[None])
    (st,) = settings.validate(
        fleet_with(gw(group="8", port=9000, sync_interval_s=0.1, liveness_interval_s=0.01), policy=CONTROL)
    )
    assert st.workers_on_command_line  # no key: given on its command line, so in flight at the start

    def members(url: str, key: Any, timeout_s: float, key_env: str | None = None) -> Membership:
        return Membership(url, key, timeout_s=timeout_s, key_env=key_env, transport=httpx.MockTransport(fake))

    deps = world.deps()
    deps.membership, deps.read_control, deps.clock = members, control, time.monotonic
    sup = GatewaySupervisor(st, GatewayKeys(), deps)
    thread = threading.Thread(target=sup.run)
    thread.start()
    try:
        # the gateway "started" with none listed here; its start's jobs are in flight, so nothing is sent yet
        wait_for(lambda: sup.state is ServerState.READY and len(control.reads) >= 4, 10, "a few sync rounds")
        (sync_thread,) = [t for t in threading.enumerate() if t.name.startswith("gateway-sync-")]
        assert fake.bodies == []
        fake.workers = {
            "w1": {"id": "w1", "url": "http://10.0.0.1:8001", "is_healthy": True},
            "w2": {"id": "w2", "url": "http://10.0.0.2:8001", "is_healthy": True},
        }  # the start's workers show: chat-2 is RESTARTING, so it leaves
        wait_for(lambda: listed(fake) == ["http://10.0.0.1:8001"], 10, "chat-2 removed")
        control.hosts["10.0.0.2"] = [("chat-2", "READY")]
        wait_for(lambda: listed(fake) == ["http://10.0.0.1:8001", "http://10.0.0.2:8001"], 10, "chat-2 back")
    finally:
        sup.request_stop()
        thread.join(10)
    assert not thread.is_alive() and sup.state is ServerState.STOPPED
    assert not sync_thread.is_alive()  # the sync ended with its gateway


def test_a_gateway_with_its_own_key_is_given_only_the_ready_replicas_and_those_not_heard(caplog) -> None:
    from _waiting import wait_for

    fake = FakeGateway(key="g", delay=1)
    control = FakeControl({"10.0.0.1": [("chat-1", "DRAINING")], "10.0.0.2": "no answer within 1 s"})
    (st,) = settings.validate(fleet_with(
        gw(group="8", port=9000, api_key_env="G", sync_interval_s=0.1, liveness_interval_s=0.01),
        top='api_key_env = "W"\n', policy=CONTROL,
    ))  # fmt: skip
    assert not st.workers_on_command_line

    def members(url: str, key: Any, timeout_s: float, key_env: str | None = None) -> Membership:
        return Membership(url, key, timeout_s=timeout_s, key_env=key_env, transport=httpx.MockTransport(fake))

    deps = World(lifetimes=[None]).deps()
    deps.membership, deps.read_control, deps.clock = members, control, time.monotonic
    sup = GatewaySupervisor(st, GatewayKeys(worker=Secret("w"), gateway=Secret("g")), deps)
    caplog.set_level("INFO")
    thread = threading.Thread(target=sup.run)
    thread.start()
    try:
        wait_for(lambda: sup.state is ServerState.READY and len(control.reads) >= 6, 10, "a few sync rounds")
        assert [b["url"] for b in fake.bodies] == ["http://10.0.0.2:8001"]  # chat-2 not heard: registered anyway
        assert "registered 1 worker(s) through POST /workers: http://10.0.0.2:8001 (not: chat-1 is DRAINING)" in (
            caplog.text
        )
        control.hosts["10.0.0.1"] = [("chat-1", "READY")]
        wait_for(lambda: listed(fake) == ["http://10.0.0.1:8001", "http://10.0.0.2:8001"], 10, "chat-1 added")
        assert fake.bodies[-1] == {"url": "http://10.0.0.1:8001", "api_key": "w", **st.worker_health}
    finally:
        sup.request_stop()
        thread.join(10)
    assert not thread.is_alive() and sup.state is ServerState.STOPPED


# ---- the CLI ----------------------------------------------------------------------------------------------


def test_dry_run_prints_the_exact_settings_and_no_key(tmp_path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from model_server.cli import main

    table = tmp_path / "fleet.toml"
    table.write_text('api_key_env = "W_TEST"\n' + POLICY + SERVERS + gw(group="8", port=9000, api_key_env="G_TEST"))
    monkeypatch.setenv("W_TEST", "sk-engine-key-000")
    monkeypatch.setenv("G_TEST", "sk-gateway-key-000")
    with pytest.raises(SystemExit) as code:
        main(["gateway", "--config", str(table), "--dry-run"])
    assert code.value.code == 0
    out = capsys.readouterr()
    (printed,) = json.loads(out.out)
    assert printed["router_args"]["cb_failure_threshold"] == 7 and printed["api_key"] == "from $G_TEST"
    assert " -m model_server.gateway.launcher " in printed["command"]
    assert "sk-" not in out.out + out.err
    with pytest.raises(SystemExit) as code:
        main(["gateway", "--config", str(table), "--group", "9", "--dry-run"])
    assert code.value.code == 2 and "--group 9 names no group" in capsys.readouterr().err


def test_the_package_surface() -> None:
    assert gateway_pkg.__all__ == ["GatewayPolicy", "GatewaySpec"]
    assert membership.__all__ == ["Membership"]
    assert sync.__all__ == [
        "JOB_PATIENCE_S", "READY", "Job", "Member", "Replica", "SyncPlan", "parse_workers", "plan_sync", "wanted",
    ]  # fmt: skip
    assert sync_loop.__all__ == ["CALL_TIMEOUT_S", "SyncLoop"]
    assert GatewaySpec(group=8, port=1).name == "gateway-8"
    assert supervisor.__all__ and settings.__all__ and command.__all__
    probe = (
        "import sys, model_server.gateway.supervisor, model_server.gateway.launcher, model_server.cli.gateway; "
        "bad = sorted(m for m in sys.modules if m.startswith(('model_server.client', 'sglang_router'))); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr  # the gateway never imports the client; sglang_router lazily
