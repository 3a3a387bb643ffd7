"""What `model-server status` shows of a gateway: the answers turned into a view (pure), the read's phrases and
where its key goes (an in-process transport), and the fleet view that carries both (no socket)."""

from __future__ import annotations

import json

import httpx
import pytest
from _client_sims import servers_toml

from model_server.cli.status import gateway_lines
from model_server.common.control_status import ControlAnswer
from model_server.config import parse_fleet
from model_server.gateway.settings import resolve
from model_server.gateway.status_read import read_gateway
from model_server.gateway.status_view import GatewayAnswer, WorkerView, gateway_view
from model_server.gateway.sync import Member, parse_workers
from model_server.launcher import fleet_view as fv

KEY = "sk-gateway-status-0123456789"
URL = "http://127.0.0.1:18200"
SERVERS = {"http://127.0.0.1:1001": "8-0", "http://127.0.0.1:1002": "8-1", "http://127.0.0.1:1003": "8-2"}


def workers(*entries: tuple[str, bool]) -> dict:
    return {"workers": [{"id": str(i), "url": u, "is_healthy": h, "load": 0} for i, (u, h) in enumerate(entries)]}


def answered(data: object, status: int = 200) -> GatewayAnswer:
    return GatewayAnswer(URL, 200, workers_status=status, workers_data=data)


# ---- the view (pure) -------------------------------------------------------------------------------------


def test_a_gateway_with_every_worker_healthy_names_them_by_server() -> None:
    data = workers(("http://127.0.0.1:1001/", True), ("HTTP://127.0.0.1:1002", True))  # spelled its own way
    view = gateway_view("gateway-8", "8", answered(data), SERVERS, ready=["http://127.0.0.1:1001"])
    assert view.up and view.why == "" and view.ok
    assert [(w.server, w.healthy) for w in view.workers] == [("8-0", True), ("8-1", True)]
    assert view.unhealthy == () and view.missing == ()


def test_an_unhealthy_worker_is_flagged_by_its_server_name_and_a_stranger_by_its_url() -> None:
    data = workers(("http://127.0.0.1:1001", True), ("http://127.0.0.1:1002", False), ("http://10.9.9.9:5", False))
    view = gateway_view("gateway-8", "8", answered(data), SERVERS)
    assert view.up and not view.ok
    assert view.unhealthy == ("8-1", "http://10.9.9.9:5")
    assert view.workers[2] == WorkerView("http://10.9.9.9:5", None, False)
    assert gateway_lines(view) == [
        "gateway gateway-8 reports 8-1 unhealthy: it sends it no request until its health checks pass",
        "gateway gateway-8 reports http://10.9.9.9:5 unhealthy: it sends it no request until its health checks pass",
    ]


def test_a_ready_replica_the_gateway_does_not_list_is_flagged() -> None:
    data = workers(("http://127.0.0.1:1001", True))
    ready = ["http://127.0.0.1:1001", "http://127.0.0.1:1003"]
    view = gateway_view("gateway-8", "8", answered(data), SERVERS, ready=ready)
    assert view.missing == ("8-2",) and not view.ok
    assert "gateway gateway-8 does not list 8-2, which its pipeline reports READY" in gateway_lines(view)[0]


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (GatewayAnswer(URL, problem="connection refused: nothing listens there"), "connection refused"),
        (GatewayAnswer(URL, problem="no answer within 3 s"), "no answer within 3 s"),
        (GatewayAnswer(URL, 503), "/liveness answered 503"),
    ],
)
def test_a_gateway_that_does_not_answer_is_a_view_saying_why(answer: GatewayAnswer, why: str) -> None:
    view = gateway_view("gateway-8", "8", answer, SERVERS, ready=list(SERVERS))
    assert not view.up and why in view.why and view.workers == () and view.missing == ()
    assert gateway_lines(view) == []  # its row says it


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        (answered(None, 401), "GET /workers answered 401: export MS_GW_KEY=<the gateway's key> here"),
        (answered(None, 500), "GET /workers answered 500"),
        (answered(None, 403), "GET /workers answered 403: export MS_GW_KEY=<the gateway's key> here"),
        (GatewayAnswer(URL, 200, workers_problem="no answer within 3 s"), "GET /workers: no answer within 3 s"),
        (answered({"total": 3}), 'no "workers" list'),
        (answered({"workers": [{"is_healthy": True}]}), "no url in workers[0]"),
    ],
)
def test_a_worker_list_that_cannot_be_read_says_why_and_the_gateway_is_still_up(
    answer: GatewayAnswer, problem: str
) -> None:
    view = gateway_view("gateway-8", "8", answer, SERVERS, ready=list(SERVERS), key_env="MS_GW_KEY")
    assert view.up and problem in view.workers_problem and view.missing == () and not view.ok
    assert gateway_lines(view) == [f"gateway gateway-8: its worker list is unknown: {view.workers_problem}"]


def test_a_refusal_with_no_key_named_says_where_to_name_one() -> None:
    view = gateway_view("gateway-8", "8", answered(None, 401), SERVERS)
    assert "the table names none: set api_key_env in its [[gateways]] entry" in view.workers_problem


def test_parse_workers_takes_only_a_true_is_healthy_as_healthy() -> None:
    data = {"workers": [{"url": "a", "is_healthy": "yes"}, {"url": "b"}, {"url": "c", "is_healthy": True}]}
    members, problem = parse_workers(data)
    assert problem == "" and [(m.url, m.healthy) for m in members] == [("a", False), ("b", False), ("c", True)]
    assert members[2] == Member("", "c", healthy=True)


# ---- the read (an in-process transport) -------------------------------------------------------------------


def client(handler) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(handler))


def test_the_read_sends_the_key_only_with_get_workers() -> None:
    seen: dict[str, str | None] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen[request.url.path] = request.headers.get("authorization")
        if request.url.path == "/liveness":
            return httpx.Response(200, text="OK")
        return httpx.Response(200, json=workers(("http://127.0.0.1:1001", True)))

    with client(handler) as c:
        answer = read_gateway(URL, KEY, 2.0, client=c)
    assert seen == {"/liveness": None, "/workers": f"Bearer {KEY}"}
    assert answer.liveness_status == 200 and answer.workers_status == 200 and KEY not in repr(answer)
    assert read_gateway(URL, None, 2.0, client=client(handler)).problem == ""


@pytest.mark.parametrize(
    ("fail", "why"),
    [
        (httpx.ConnectError("[Errno 111] Connection refused"), "connection refused: nothing listens there"),
        (httpx.ReadTimeout("timed out"), "no answer within 1.5 s"),
        (httpx.ConnectError("[Errno -2] Name or service not known"), "cannot connect ([Errno -2] Name or service"),
        (httpx.RemoteProtocolError("Server disconnected without a response"), "RemoteProtocolError: Server discon"),
    ],
)
def test_the_read_turns_what_the_network_does_into_a_short_phrase(fail: Exception, why: str) -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise fail

    assert why in read_gateway(URL, KEY, 1.5, client=client(down)).problem

    def slow_list(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/workers":
            raise fail
        return httpx.Response(200, text="OK")

    answer = read_gateway(URL, KEY, 1.5, client=client(slow_list))
    assert answer.problem == "" and why in answer.workers_problem


def test_the_read_keeps_a_refusal_and_an_answer_that_is_not_json() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="OK") if request.url.path == "/liveness" else httpx.Response(401)

    assert read_gateway(URL, None, 1.0, client=client(refuse)).workers_status == 401

    def html(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="OK" if request.url.path == "/liveness" else "<html>")

    answer = read_gateway(URL, None, 1.0, client=client(html))
    assert answer.workers_status == 200 and answer.workers_data is None


# ---- the fleet view carries the gateways (no socket) ---------------------------------------------------------


def table(control: str = "") -> str:
    servers = servers_toml({"8": ("completion", [1001, 1002, 1003]), "7": ("embedding", [1004])})
    gateways = (
        '[[gateways]]\ngroup = "8"\nport = 18200\napi_key_env = "MS_GW_STATUS_KEY"\n\n'
        '[[gateways]]\ngroup = "7"\nhost = "0.0.0.0"\nport = 18210\n'
    )
    return f'[launch]\n{control}\n[gpu_inventory]\nsource = "simulated"\n{servers}\n{gateways}'


def test_read_fleet_reads_each_gateway_with_its_own_key_and_the_view_never_holds_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MS_GW_STATUS_KEY", KEY)
    fleet = parse_fleet(table(), source="<gateways>")
    asked: list[tuple[str, str | None, float]] = []

    def read(url: str, key: str | None, timeout_s: float) -> GatewayAnswer:
        asked.append((url, key, timeout_s))
        if url.endswith(":18210"):
            return GatewayAnswer(url, problem="connection refused: nothing listens there")
        return answered(workers(("http://127.0.0.1:1001", True), ("http://127.0.0.1:1002", False)))

    view = fv.read_fleet(
        fleet, timeout_s=1.5, identities=frozenset({"192.0.2.1"}), probe_one=lambda s, t: fv.Live(True), read_one=read
    )
    assert sorted(asked) == [(URL, KEY, 1.5), ("http://127.0.0.1:18210", None, 1.5)]  # a wildcard: loopback
    chat, embed = view.gateways
    assert (chat.name, chat.up, chat.unhealthy) == ("gateway-8", True, ("8-1",))
    assert (embed.name, embed.up, embed.why) == ("gateway-7", False, "connection refused: nothing listens there")
    assert view.gateways_down == (embed,) and view.down == ()
    text = json.dumps(view.as_dict())
    assert KEY not in text
    assert view.as_dict()["gateways"][0]["workers"][1] == {"url": "http://127.0.0.1:1002", "server": "8-1",
                                                           "healthy": False}  # fmt: skip


def test_merge_gateways_flags_the_replicas_a_control_api_calls_ready() -> None:
    fleet = parse_fleet(table("control_port = 9100"), source="<gateways>")
    specs = fv.hosts_of(fleet.servers)["127.0.0.1"]
    states = [{"name": n, "state": st} for n, st in (("8-0", "READY"), ("8-1", "DRAINING"), ("8-2", "READY"))]
    host = fv.merge_host("127.0.0.1", specs, ControlAnswer("u", {"servers": states}), None, {})
    settings = [resolve(fleet, g) for g in fleet.gateways]
    answers = [answered(workers(("http://127.0.0.1:1001", True))), answered(workers(("http://127.0.0.1:1004", True)))]
    chat, embed = fv.merge_gateways(fleet, settings, answers, [host])
    assert chat.missing == ("8-2",)  # 8-1 is DRAINING: rightly not a worker
    assert embed.missing == () and embed.ok  # 7-0 was not heard: nothing to say
