"""The fleet dashboard: its data and routes in process, then the page itself in a real (headless) Chromium.

In process (no browser, no engine): the pure parts (an engine's load, a
client's view, where a write goes), and the routes on a fake second host
(``httpx.MockTransport``): ``GET /fleet`` merges both hosts, writes for the
other host are forwarded with the browser's key, refused without it.

In the browser: one pipeline of the 5 simulated servers of configs/local.toml
(free ports, files in a temporary directory, the control API on, a client's
metrics endpoint configured) and one Chromium serve the whole module. The
page lists every server READY; a ``kill -9`` of an engine shows on the page
(it leaves READY, comes back READY with restarts = 1) without a reload; the
actions work with the key (drain, start, a rolling restart) and are refused
without it.

Chromium is Debian's (``/usr/bin/chromium``), driven by Playwright's Python
package (``executable_path``; never ``playwright install``). Without either
the browser tests skip, unless ``MODEL_SERVER_REQUIRE_BROWSER=1`` (CI), then
they fail. ``MODEL_SERVER_DASHBOARD_SCREENSHOT=docs/dashboard.png`` also takes
README's screenshot during the restart.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from _pipeline_runs import ROOT, Run, all_ready, free_port, local_copy
from _waiting import wait_for
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest

from model_server.common.control_status import Recorded
from model_server.config import load_fleet
from model_server.launcher import dashboard_data as view
from model_server.launcher.control_api import build_app
from model_server.launcher.dashboard import STATIC, static_file
from model_server.launcher.events_file import EventLog
from model_server.launcher.fleet_control import FleetControl
from model_server.launcher.gpu import make_inventory
from model_server.launcher.lifecycle import ServerState
from model_server.launcher.metrics import PipelineMetrics
from model_server.launcher.redact import Secret
from model_server.launcher.status_file import ServerStatus, StatusBoard
from model_server.sim.metrics import SimMetrics

KEY = "dashboard-key-for-the-tests-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAMES = ["chat-1", "chat-2", "chat-3", "embed-1", "embed-2"]
KEY_ITEM = "model-server-control-key"


def _client_metrics_text(**per_replica: int) -> str:
    from model_server.client.metrics import ClientMetrics

    registry = CollectorRegistry()
    metrics = ClientMetrics(registry)
    for replica, n in per_replica.items():
        for _ in range(n):
            metrics.attempt("8", replica)
            metrics.latency("8", replica, 0.02)
        metrics.failover("8", replica)
        metrics.failure("8", replica, "connection")
    return generate_latest(registry).decode()


# ---- pure -------------------------------------------------------------------------------------------


def test_engine_load_reads_sglang_gauges_and_says_none_without_them() -> None:
    sim = SimMetrics("llama-8b", max_total_num_tokens=1000, context_len=4096)
    load = view.engine_load(sim.render(running=3, queued=2, used_tokens=250).decode())
    assert load == view.EngineLoad(running=3, queued=2, token_usage=0.25, gen_throughput=0.0, cache_hit_rate=0.0)
    assert view.engine_load("# nothing\nother_metric 1\n") is None
    with pytest.raises(ValueError):
        view.engine_load("sglang:num_running_reqs{ not prometheus")


def test_client_replicas_from_a_clients_metrics_and_its_optional_breaker_gauges() -> None:
    replicas = view.client_replicas(_client_metrics_text(**{"chat-1": 4, "chat-2": 1}))
    assert [(r.group, r.replica, r.requests, r.failovers, r.failures) for r in replicas] == [
        ("8", "chat-1", 4.0, 1.0, 1.0),
        ("8", "chat-2", 1.0, 1.0, 1.0),
    ]
    assert replicas[0].mean_latency_s == pytest.approx(0.02) and replicas[0].breaker is None
    extra = (
        'model_server_client_breaker_state{group="8",replica="chat-1",state="open"} 1\n'
        'model_server_client_breaker_state{group="8",replica="chat-1",state="closed"} 0\n'
        'model_server_client_smoothed_latency_seconds{group="8",replica="chat-1"} 0.5\n'
    )
    one = view.client_replicas(extra)
    assert one == (view.ClientReplica("8", "chat-1", breaker="open", smoothed_latency_s=0.5),)


def test_write_target_says_here_there_or_why_not() -> None:
    hosts = {"a": ["chat-1", "chat-2"], "b": ["embed-1"]}
    here = ["chat-1", "chat-2"]
    assert view.write_target("server", "chat-1", "drain", here, hosts) == view.WriteTarget("/servers/chat-1/drain")
    assert view.write_target("server", "embed-1", "start", here, hosts) == view.WriteTarget(
        "/servers/embed-1/start", "b"
    )
    assert view.write_target("group", "8", "rollout", here, hosts, "a") == view.WriteTarget("/groups/8/rollout")
    assert view.write_target("group", "7", "rollout", here, hosts, "b") == view.WriteTarget("/groups/7/rollout", "b")
    assert view.write_target("group", "7", "rollout", here, hosts) == view.WriteTarget("/groups/7/rollout")
    status, why = view.write_target("server", "chat-1", "explode", here, hosts)  # type: ignore[misc]
    assert status == 404 and "drain, undrain, restart, stop, start" in why
    status, why = view.write_target("server", "nope", "drain", here, hosts)  # type: ignore[misc]
    assert status == 404 and "chat-1, chat-2, embed-1" in why
    status, why = view.write_target("group", "7", "rollout", here, hosts, "c")  # type: ignore[misc]
    assert status == 404 and "no host 'c'" in why


def test_an_unreachable_host_shows_its_servers_unknown_with_why() -> None:
    specs = [{"name": "embed-1", "group": "7", "host": "b", "port": 1}]
    host = view.host_view("b", specs, view.HostStatus(problem="nothing listens"), False, {}, now=100.0)
    assert host["reachable"] is False and host["problem"] == "nothing listens"
    assert host["groups"][0]["servers"][0]["state"] == view.UNKNOWN
    page = view.fleet_page("t.toml", [host], [], [], 100.0, writable=False)
    assert page["states"] == {"UNKNOWN": 1}
    status = {"started": 50.0, "servers": [{**specs[0], "state": "READY", "pid": 7, "since": 90.0}], "rollouts": {}}
    both = [*specs, {"name": "embed-2", "group": "7", "host": "b", "port": 2}]
    answer = view.HostStatus(status, {"embed-1": Recorded("READY", 7, since=90.0)})
    host = view.host_view("b", both, answer, False, {"embed-1": (view.EngineLoad(running=2), "")}, now=100.0)
    rows = {s["name"]: s for s in host["groups"][0]["servers"]}
    assert rows["embed-1"]["in_state_s"] == 10.0 and rows["embed-1"]["load"]["running"] == 2
    assert host["uptime_s"] == 50.0
    assert rows["embed-2"]["state"] == view.UNKNOWN and rows["embed-2"]["last_error"] == view.NOT_RUN


def test_the_clients_metrics_urls_are_checked_in_the_table() -> None:
    from pydantic import ValidationError

    from model_server.config import LaunchPolicy

    urls = ("http://app-1:9400/metrics", "https://app-2/metrics")
    assert LaunchPolicy(dashboard_client_metrics=urls).dashboard_client_metrics == urls
    for bad in ("app-1:9400/metrics", "http://app 1/metrics"):
        with pytest.raises(ValidationError, match="give each client's metrics endpoint as http://host:port/metrics"):
            LaunchPolicy(dashboard_client_metrics=(bad,))


# ---- in process: the routes, a second host behind a fake transport ----------------------------------


class FakeHost:
    """Host ``b`` of the table: its control API and its engines' /metrics, through an httpx.MockTransport."""

    def __init__(self, control_port: int, engine_ports: dict[str, int]) -> None:
        self.control_port = control_port
        self.engine_ports = engine_ports
        self.posts: list[tuple[str, str | None, bytes]] = []
        self.sim = SimMetrics("gte-7b", max_total_num_tokens=1000, context_len=4096)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.host == "app" and url.path == "/metrics":
            return httpx.Response(200, text=_client_metrics_text(**{"chat-1": 2}))
        if url.host != "b":
            raise httpx.ConnectError("connection refused", request=request)
        if url.port == self.control_port and request.method == "POST":
            self.posts.append((url.path, request.headers.get("authorization"), request.content))
            return httpx.Response(202, json={"server": url.path.split("/")[2], "accepted": "undrain"})
        if url.port == self.control_port and request.headers.get("authorization") != f"Bearer {KEY}":
            return httpx.Response(401, json={"error": "a control key is needed"})
        if url.path == "/status":
            servers = [
                {"name": n, "group": "7", "host": "b", "port": p, "state": s, "pid": 100 + i, "restarts": i,
                 "since": 1000.0, "last_error": "", "gpus": [{"index": i, "used_mib": 2048, "total_mib": 81920}]}
                for i, ((n, p), s) in enumerate(zip(self.engine_ports.items(), ("READY", "DRAINING")))
            ]  # fmt: skip
            return httpx.Response(200, json={"started": 900.0, "servers": servers, "rollouts": {}})
        if url.path == "/events":
            event = {"time": 2e9, "server": "embed-2", "from": "READY", "to": "DRAINING", "reason": "asked"}
            return httpx.Response(200, json={"file": None, "events": [event]})
        if url.path == "/metrics" and url.port in self.engine_ports.values():
            return httpx.Response(200, text=self.sim.render(running=3, queued=1, used_tokens=500).decode())
        return httpx.Response(404, json={"error": "no route"})


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[tuple[TestClient, FakeHost]]:
    """This host runs group 8 (no engine answers); host ``b`` of the table runs group 7, behind a FakeHost.

    The table is given to build_app, as the pipeline gives it.
    """
    launch = {"control_port": "9100", "dashboard_client_metrics": '["http://app:9400/metrics"]'}
    path = local_copy(tmp_path, launch=launch)
    text = path.read_text()
    cut = text.index('name = "embed-1"')
    path.write_text(text[:cut] + text[cut:].replace('host = "127.0.0.1"', 'host = "b"'))
    table = load_fleet(path)
    here = [s for s in table.servers if s.host == "127.0.0.1"]
    fake = FakeHost(9100, {s.name: s.port for s in table.servers if s.host == "b"})
    meta = {"config": str(path)}
    board = StatusBoard(tmp_path / "status.json", [ServerStatus(s.name, s.group, s.host, s.port) for s in here], meta)
    for s in here:
        board.update(s.name, state="READY", pid=os.getpid())
    with ThreadPoolExecutor(1) as pool:
        control = FleetControl(here, board, make_inventory(table.gpu_inventory), pool, lambda _s: None, table.launch)  # type: ignore[arg-type,return-value]
        metrics = PipelineMetrics(control.statuses, control.read_gpus)
        events = EventLog()
        events.record("chat-1", ServerState.STARTING, ServerState.READY, "pid 1")
        app = build_app(control, events, metrics, Secret(KEY), table, dashboard_transport=httpx.MockTransport(fake))
        yield TestClient(app), fake  # its client is "testclient": another machine, so reads need the key too


@pytest.mark.timeout(30)
def test_fleet_merges_every_host_with_loads_events_and_clients(two_hosts: tuple[TestClient, FakeHost]) -> None:
    client, _fake = two_hosts
    refused = client.get("/fleet")
    assert refused.status_code == 401 and "Authorization: Bearer" in refused.json()["error"]
    answer = client.get("/fleet", headers=AUTH)
    assert answer.status_code == 200 and KEY not in answer.text
    page = answer.json()
    assert [(h["host"], h["here"], h["reachable"]) for h in page["hosts"]] == [
        ("127.0.0.1", True, True),
        ("b", False, True),
    ]
    rows = {s["name"]: s for h in page["hosts"] for g in h["groups"] for s in g["servers"]}
    assert sorted(rows) == sorted(NAMES) and page["states"] == {"DRAINING": 1, "READY": 4}
    assert rows["embed-1"]["load"]["running"] == 3 and rows["embed-1"]["load"]["token_usage"] == 0.5
    assert rows["embed-1"]["gpus"] == [{"index": 0, "used_mib": 2048.0, "total_mib": 81920.0}]
    assert rows["chat-1"]["load"] is None and "ConnectError" in rows["chat-1"]["load_problem"]
    assert [(e["host"], e["server"], e["to"]) for e in page["events"]] == [
        ("b", "embed-2", "DRAINING"),
        ("127.0.0.1", "chat-1", "READY"),
    ]
    assert page["clients"] == [
        {"url": "http://app:9400/metrics", "problem": "", "replicas": [{
            "group": "8", "replica": "chat-1", "requests": 2.0, "failures": 1.0, "failovers": 1.0, "resumes": 0.0,
            "stalls": 0.0, "mean_latency_s": pytest.approx(0.02), "breaker": None, "smoothed_latency_s": None,
        }]},
    ]  # fmt: skip
    assert page["writable"] is True


@pytest.mark.timeout(30)
def test_writes_for_another_host_are_forwarded_with_the_key_and_refused_without(
    two_hosts: tuple[TestClient, FakeHost],
) -> None:
    client, fake = two_hosts
    for headers, says in (({}, "Authorization: Bearer"), ({"Authorization": "Bearer wrong"}, "not this pipeline's")):
        refused = client.post("/fleet/servers/embed-2/undrain", headers=headers)
        assert refused.status_code == 401 and says in refused.json()["error"]
    assert fake.posts == []  # nothing reached the other host
    answer = client.post("/fleet/servers/embed-2/undrain", headers=AUTH)
    assert answer.status_code == 202 and answer.json()["server"] == "embed-2"
    assert client.post("/fleet/groups/7/rollout", params={"host": "b"}, headers=AUTH).status_code == 202
    assert fake.posts == [
        ("/servers/embed-2/undrain", f"Bearer {KEY}", b""),
        ("/groups/7/rollout", f"Bearer {KEY}", b""),
    ]
    local = client.post("/fleet/servers/chat-1/drain", headers=AUTH, content=b'{"then": "explode"}')
    assert local.status_code == 422 and "then" in local.json()["error"]  # the control API's own drain route answered
    unknown = client.post("/fleet/servers/nope/drain", headers=AUTH)
    assert unknown.status_code == 404 and "no server named 'nope' in the table" in unknown.json()["error"]
    assert client.post("/fleet/servers/chat-1/explode", headers=AUTH).status_code == 404
    assert len(fake.posts) == 2


@pytest.mark.timeout(30)
def test_the_page_and_its_files_are_served_from_the_package_with_no_key_and_no_cdn(
    two_hosts: tuple[TestClient, FakeHost],
) -> None:
    client, _fake = two_hosts
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name in STATIC:
        text = static_file(name).decode()
        assert "http://" not in text.replace("http://host", "") and "https://" not in text, name  # nothing fetched
        assert KEY not in text
    assert client.get("/dashboard/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/dashboard/app.css").status_code == 200
    assert client.get("/dashboard/secrets.txt").status_code == 404
    assert client.get("/dashboard/index.html").status_code == 404  # the page is GET /
    assert client.head("/").status_code == 200
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"model_server.launcher" = ["static/*.html", "static/*.js", "static/*.css"]' in pyproject


# ---- in the browser ----------------------------------------------------------------------------------


def _browser_missing() -> tuple[str | None, str]:
    """(Chromium's path, "") or (None, why the browser tests cannot run)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None, "the Python package playwright is not installed (pip install -e '.[test]')"
    given = os.environ.get("MODEL_SERVER_CHROMIUM")
    for name in [given] if given else ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]:
        path = shutil.which(name)
        if path:
            return path, ""
    return None, "no Chromium found (apt-get install chromium, or set MODEL_SERVER_CHROMIUM to a Chromium binary)"


class Site:
    """The module's pipeline, its page in one Chromium, and a client whose metrics the page shows."""

    def __init__(self, run: Run, port: int, page: Any, client: Any) -> None:
        self.run, self.page, self.client = run, page, client
        self.base = f"http://127.0.0.1:{port}"
        self.api = httpx.Client(base_url=self.base, timeout=10)
        self.errors: list[str] = []

    def row(self, name: str) -> Any:
        return self.page.locator(f'#hosts tr[data-server="{name}"]')

    def status(self) -> dict[str, dict]:
        return {s["name"]: s for s in self.api.get("/status").json()["servers"]}

    def set_key(self, key: str) -> None:
        """Through the page's own dialog, as a person would."""
        self.page.click("#key-button")
        self.page.fill("#key-input", key)
        self.page.click("#key-save")

    def act(self, button: Any) -> str:
        """Click an action, confirm it in the page's dialog; the page's notice afterwards."""
        from playwright.sync_api import expect

        self.page.evaluate("document.getElementById('notice').textContent = ''")
        button.click()
        expect(self.page.locator("#confirm")).to_be_visible()
        self.page.click("#confirm-ok")
        expect(self.page.locator("#notice")).not_to_have_text("", timeout=10_000)
        return self.page.locator("#notice").inner_text()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    chromium, missing = _browser_missing()
    if chromium is None:
        if os.environ.get("MODEL_SERVER_REQUIRE_BROWSER") == "1":
            pytest.fail(f"MODEL_SERVER_REQUIRE_BROWSER=1 and {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright
    from prometheus_client import start_http_server

    from model_server.client import ModelServer

    tmp_path = tmp_path_factory.mktemp("dashboard")
    registry = CollectorRegistry()
    metrics_port = free_port()
    metrics_server, metrics_thread = start_http_server(metrics_port, "127.0.0.1", registry=registry)
    port = free_port()
    launch = {
        "control_port": str(port), "control_key_env": '"MS_TEST_DASHBOARD_KEY"',
        "dashboard_client_metrics": json.dumps([f"http://127.0.0.1:{metrics_port}/metrics"]),
        # a restart waits 1-2 s before the new engine starts: a page that polls every second sees it happen
        "restart_backoff_initial_s": "2", "restart_backoff_max_s": "4", "drain_notice_s": "0.5",
    }  # fmt: skip
    config = local_copy(tmp_path, launch=launch)
    run = Run(config, tmp_path, env={"MS_TEST_DASHBOARD_KEY": KEY})
    client = None
    try:
        run.wait(all_ready(NAMES), "the 5 servers READY", 60)
        client = ModelServer(config, metrics_registry=registry)
        for _ in range(3):
            client.chat("8", [{"role": "user", "content": "hello"}], max_tokens=4)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(15_000)
            s = Site(run, port, page, client)
            page.on("pageerror", lambda err: s.errors.append(str(err)))
            page.goto(s.base + "/")
            yield s
            assert s.errors == [], s.errors
            browser.close()
        client.close()
        client = None
        assert run.stop() == 0, run.output()
        logged = run.output(tail=False)
        assert "Traceback" not in logged and KEY not in logged
    finally:
        if client is not None:
            client.close()
        run.cleanup()
        metrics_server.shutdown()
        metrics_thread.join(5)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_the_page_lists_every_server_ready_with_its_load_and_the_clients_view(site: Site) -> None:
    from playwright.sync_api import expect

    for name in NAMES:
        expect(site.row(name)).to_have_attribute("data-state", "READY")
    assert site.page.locator("#hosts tr[data-server]").count() == len(NAMES)
    expect(site.page.locator('#summary .chip[data-state="READY"]')).to_have_text("5 READY")
    pids = {n: str(s["pid"]) for n, s in site.status().items()}
    for name in NAMES:
        expect(site.row(name)).to_have_attribute("data-pid", pids[name])
        expect(site.row(name).locator(".restarts")).to_have_text("0")
        expect(site.row(name).locator(".gpu .val")).to_have_text("0.0/80.0 GiB")  # the simulated 80 GiB GPUs
    expect(site.row("chat-1").locator(".running")).to_have_text("0")  # the engine's /metrics was read
    expect(site.page.locator(".group[data-group='8'] tr[data-server]")).to_have_count(3)
    expect(site.page.locator("#clients-section")).to_be_visible()
    requests = site.page.locator('.client tr[data-group="8"] td.requests')
    expect(requests).not_to_have_count(0)
    assert sum(float(t) for t in requests.all_inner_texts()) >= 3
    assert site.page.locator("button[data-action]").count() == 0  # no key: read-only
    expect(site.page.locator("#mode")).to_have_text("read-only: enter the control key to act")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_killed_engine_leaves_ready_and_comes_back_on_the_page_without_a_reload(site: Site) -> None:
    from playwright.sync_api import expect

    page, row = site.page, site.row("chat-2")
    expect(row).to_have_attribute("data-state", "READY")
    old_pid = int(row.get_attribute("data-pid"))
    page.evaluate("window.__sameDocument = true")
    load = _load(site, os.environ.get("MODEL_SERVER_DASHBOARD_SCREENSHOT"))
    try:
        os.kill(old_pid, signal.SIGKILL)
        page.wait_for_function(
            "() => document.querySelector('#hosts tr[data-server=\"chat-2\"]').dataset.state !== 'READY'",
            timeout=15_000,
        )
        if load is not None:
            page.screenshot(path=str(load.path), full_page=True)
        expect(row).to_have_attribute("data-state", "READY", timeout=30_000)
    finally:
        if load is not None:
            load.stop()
    expect(row).to_have_attribute("data-restarts", "1")
    assert int(row.get_attribute("data-pid")) != old_pid
    assert page.evaluate("window.__sameDocument") is True  # updated in place, never reloaded
    restart = page.locator('#events tr[data-server="chat-2"][data-to="RESTARTING"]').first
    expect(restart).to_contain_text("killed by signal 9")
    expect(row.locator(".error")).to_contain_text("killed by signal 9")


class _Load:
    """Chat requests on group 8 from a few threads until stopped: the screenshot shows engines at work."""

    def __init__(self, client: Any, path: Path) -> None:
        self.path, self._stop = path, threading.Event()
        self._pool = ThreadPoolExecutor(4)
        message = [{"role": "user", "content": "tell me a long story"}]
        self._futures = [self._pool.submit(self._loop, client, message) for _ in range(4)]

    def _loop(self, client: Any, message: list[dict[str, str]]) -> None:
        while not self._stop.is_set():
            client.chat("8", message, max_tokens=400, extra_body={"ignore_eos": True})

    def busy(self) -> bool:
        for f in self._futures:
            if f.done():
                f.result()  # a thread that ended: its error
        return True

    def stop(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True)
        for f in self._futures:
            f.result()


def _load(site: Site, screenshot: str | None) -> _Load | None:
    if not screenshot:
        return None
    site.set_key(KEY)  # the screenshot shows the actions too
    load = _Load(site.client, (ROOT / screenshot).resolve())
    running = site.page.locator('#hosts .group[data-group="8"] td.running')
    wait_for(lambda: load.busy() and sum(float(x) for x in running.all_inner_texts() if x != "–") >= 3, 15, "load")
    return load


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_actions_need_the_key_drain_and_start_work_with_it(site: Site) -> None:
    from playwright.sync_api import expect

    page, row = site.page, site.row("chat-3")
    refused = page.evaluate("fetch('/fleet/servers/chat-3/drain', {method: 'POST'}).then(r => r.status)")
    assert refused == 401 and site.status()["chat-3"]["state"] == "READY"
    site.set_key("not-the-key")
    said = site.act(row.locator('button[data-action="drain"]'))
    assert "refused (401)" in said and "not this pipeline's" in said
    assert site.status()["chat-3"]["state"] == "READY"

    site.set_key(KEY)
    expect(page.locator("#mode")).to_have_text("actions on")
    assert "accepted (202)" in site.act(row.locator('button[data-action="drain"]'))
    expect(row).to_have_attribute("data-state", "STOPPED", timeout=20_000)
    expect(page.locator('#events tr[data-server="chat-3"][data-to="DRAINING"]').first).to_be_visible()
    assert "accepted (202)" in site.act(row.locator('button[data-action="start"]'))
    expect(row).to_have_attribute("data-state", "READY", timeout=30_000)
    assert KEY not in page.content() and KEY not in page.url
    assert page.evaluate(f"sessionStorage.getItem('{KEY_ITEM}')") == KEY  # this tab only


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_rolling_restart_of_a_group_from_the_page(site: Site) -> None:
    from playwright.sync_api import expect

    page = site.page
    if page.evaluate(f"sessionStorage.getItem('{KEY_ITEM}')") != KEY:
        site.set_key(KEY)
    before = {n: s["pid"] for n, s in site.status().items() if n.startswith("embed")}
    button = page.locator('.group[data-group="7"] button[data-action="rollout"]')
    assert "accepted (202)" in site.act(button)
    rollout = page.locator('.group[data-group="7"] .rollout')
    expect(rollout).to_contain_text("done (2/2 done", timeout=40_000)
    after = site.status()
    for name, pid in before.items():
        assert after[name]["state"] == "READY" and after[name]["pid"] != pid
        expect(site.row(name)).to_have_attribute("data-pid", str(after[name]["pid"]))
