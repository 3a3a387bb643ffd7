"""``[client] through_gateway``: ModelServer sends a group's requests to its SGLang Model Gateway (no sockets here).

The gateway stands in as the group's one replica (several entries: several replicas), with the group's kind
and model, at the address clients reach it by, and gets the gateway's key; the other groups still go straight
to their replicas with the engines' key. A table that asks for a gateway it does not have is refused, naming
the fix. The real gateway path is in tests/test_gateway_sync.py.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from _client_sims import MESSAGES, servers_toml

from model_server.client import ModelServer
from model_server.client.replica_group import ProbeResult
from model_server.config import ClientPolicy, ServerKind, load_fleet, parse_fleet
from model_server.errors import ConfigError

SERVERS = servers_toml({"8": ("completion", [9101, 9102, 9103]), "7": ("embedding", [9201, 9202])})
GATEWAYS = """
[[gateways]]
group = "8"
port = 9300
api_key_env = "MS_TG_GATEWAY_KEY"
"""
TOP = 'api_key_env = "MS_TG_ENGINE_KEY"\n'
ENGINE_KEY, GATEWAY_KEY = "sk-engines-tg-5d1c", "sk-gateway-tg-9e2a"


def _table(client: str = 'through_gateway = ["8"]', gateways: str = GATEWAYS, top: str = TOP):
    return parse_fleet(
        f"{top}[client]\nreprobe_interval_s = 0\ncontrol_refresh_s = 0\n{client}\n{gateways}{SERVERS}", source="<t>"
    )


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MS_TG_ENGINE_KEY", ENGINE_KEY)
    monkeypatch.setenv("MS_TG_GATEWAY_KEY", GATEWAY_KEY)


def test_a_group_through_its_gateway_has_the_gateway_as_its_one_replica() -> None:
    fleet = _table()
    (gateway,) = fleet.client_replicas("8")
    assert (gateway.name, gateway.host, gateway.port, gateway.kind) == (
        "gateway-8",
        "127.0.0.1",
        9300,
        ServerKind.completion,
    )
    assert gateway.model_name == fleet.group("8")[0].model_name and gateway.base_url == "http://127.0.0.1:9300/v1"
    assert fleet.client_replicas(8) == (gateway,)  # groups are keyed by text, as in [[servers]]
    assert fleet.client_replicas("7") == fleet.group("7")  # not named: straight to its replicas
    assert fleet.client_replicas("8", ClientPolicy()) == fleet.group("8")  # a policy given in code decides
    assert fleet.client_replicas("nope") == ()


def test_the_client_reaches_a_wildcard_gateway_on_loopback_or_at_client_host_and_goes_through_every_entry() -> None:
    entries = """
[[gateways]]
group = "8"
port = 9300
host = "0.0.0.0"

[[gateways]]
name = "gw-b"
group = "8"
port = 9310
host = "0.0.0.0"
client_host = "gw-b.example"
"""
    fleet = _table(client="through_gateway = 8", gateways=entries, top="")
    assert fleet.client.through_gateway == ("8",)
    assert [(r.name, r.host, r.port) for r in fleet.client_replicas("8")] == [
        ("gateway-8", "127.0.0.1", 9300),
        ("gw-b", "gw-b.example", 9310),
    ]


@pytest.mark.parametrize(
    ("client", "gateways", "words"),
    [
        ('through_gateway = ["7"]', GATEWAYS, ["group '7'", "no [[gateways]] entry", 'group = "7"', "remove"]),
        ('through_gateway = ["9"]', GATEWAYS, ["group '9'", "the groups are: 7, 8"]),
        (
            'through_gateway = ["8"]',
            GATEWAYS + '\n[[gateways]]\nname = "b"\ngroup = "8"\nport = 9310\n',
            ["group '8'", "different api_key_env", "same api_key_env"],
        ),
    ],
)
def test_a_table_that_asks_for_a_gateway_it_does_not_have_is_refused_naming_the_fix(
    client: str, gateways: str, words: list[str], tmp_path
) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(f"{TOP}[client]\n{client}\n{gateways}{SERVERS}")
    with pytest.raises(ConfigError) as raised:
        load_fleet(path)
    for word in words:
        assert word in str(raised.value), (word, str(raised.value))


def test_a_policy_given_in_code_is_checked_against_the_table_too(keys: None) -> None:
    with pytest.raises(ConfigError, match="group '7', which has no \\[\\[gateways\\]\\] entry"):
        ModelServer(_table(client=""), policy=ClientPolicy(through_gateway=("7",)))


def test_an_unset_gateway_key_is_named_and_the_key_never_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MS_TG_ENGINE_KEY", ENGINE_KEY)
    monkeypatch.delenv("MS_TG_GATEWAY_KEY", raising=False)
    fleet = _table()
    with pytest.raises(ConfigError, match="MS_TG_GATEWAY_KEY, which is unset or empty") as raised:
        ModelServer(fleet)
    assert ENGINE_KEY not in str(raised.value)
    monkeypatch.setenv("MS_TG_GATEWAY_KEY", GATEWAY_KEY)
    assert fleet.client_api_key("8") == GATEWAY_KEY and fleet.client_api_key("7") == ENGINE_KEY
    # without its own variable a gateway asks its clients for the engines' key
    assert (
        _table(gateways=GATEWAYS.replace('api_key_env = "MS_TG_GATEWAY_KEY"\n', "")).client_api_key("8") == ENGINE_KEY
    )


class Recording(httpx.BaseTransport):
    """Answers chat and embeddings like an engine (or a gateway); notes each request's port and key."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str]] = []
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.seen.append((request.url.port or 0, request.headers.get("authorization", "")))
        if request.url.path.endswith("/embeddings"):
            return httpx.Response(200, json={"object": "list", "data": [{"index": 0, "embedding": [0.5, 0.5]}]})
        body = json.loads(request.content)
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}  # fmt: skip
        events = b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=events)


def test_requests_and_probes_of_the_group_go_to_its_gateway_with_its_key(keys: None) -> None:
    probed: list[tuple[tuple[str, ...], str | None]] = []

    def prober(specs, timeout_s, **kwargs):
        probed.append((tuple(s.name for s in specs), kwargs.get("api_key")))
        return [ProbeResult(s, 0.01, output_tokens=1) for s in specs]

    transport = Recording()
    with ModelServer(_table(), transport=transport, prober=prober) as ms:
        assert ms.chat("8", MESSAGES).choices[0].message.content == "hi"
        assert "".join(ms.stream_chat("8", MESSAGES)) == "hi"
        assert len(ms.embed("7", ["a"])) == 1
        assert set(ms.stats()["8"]) == {"gateway-8"}
    assert (("gateway-8",), GATEWAY_KEY) in probed and (("7-0", "7-1"), ENGINE_KEY) in probed
    to_gateway = [key for port, key in transport.seen if port == 9300]
    to_engines = [(port, key) for port, key in transport.seen if port != 9300]
    assert len(to_gateway) == 2 and set(to_gateway) == {f"Bearer {GATEWAY_KEY}"}
    assert len(to_engines) == 1 and to_engines[0][0] in (9201, 9202) and to_engines[0][1] == f"Bearer {ENGINE_KEY}"


def test_an_application_that_only_uses_the_gateway_needs_no_engines_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MS_TG_ENGINE_KEY", raising=False)
    monkeypatch.setenv("MS_TG_GATEWAY_KEY", GATEWAY_KEY)
    transport = Recording()
    ok = lambda specs, timeout_s, **kw: [ProbeResult(s, 0.01, output_tokens=1) for s in specs]  # noqa: E731
    with ModelServer(_table(), transport=transport, prober=ok) as ms:
        assert ms.chat("8", MESSAGES).choices[0].message.content == "hi"
        with pytest.raises(ConfigError, match="MS_TG_ENGINE_KEY, which is unset or empty"):
            ms.embed("7", ["a"])  # a group straight to its engines still says what is missing, when used
    assert transport.seen == [(9300, f"Bearer {GATEWAY_KEY}")]
    with pytest.raises(ConfigError, match="MS_TG_ENGINE_KEY"):  # without gateways, at once, as ever
        ModelServer(_table(client=""))


@pytest.mark.parametrize(
    ("host", "client_host", "url"),
    [
        ("::", None, "http://[::1]:9300/v1"),
        ("0.0.0.0", "fd00::1", "http://[fd00::1]:9300/v1"),
        ("10.0.0.5", None, "http://10.0.0.5:9300/v1"),
    ],
)
def test_the_gateway_url_a_client_and_status_use_holds_ipv6_in_brackets(host: str, client_host: str | None, url: str):
    extra = f'client_host = "{client_host}"\n' if client_host else ""
    fleet = _table(gateways=GATEWAYS + f'host = "{host}"\n' + extra, top="")
    assert fleet.client_replicas("8")[0].base_url == url
    from model_server.gateway.settings import resolve  # what status and --dry-run use

    assert resolve(fleet, fleet.gateways[0]).client_url + "/v1" == url


def test_a_gateway_named_like_a_server_is_refused_and_one_key_given_twice_is_one_key(tmp_path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(f'{TOP}{GATEWAYS}name = "8-0"\n{SERVERS}')
    with pytest.raises(ConfigError, match="gateway '8-0'.*also the name of a server"):
        load_fleet(path)
    same = GATEWAYS + '\n[[gateways]]\nname = "b"\ngroup = "8"\nport = 9310\napi_key_env = "MS_TG_ENGINE_KEY"\n'
    fleet = _table(gateways=same.replace('api_key_env = "MS_TG_GATEWAY_KEY"\n', ""))  # the fleet's, twice
    assert [r.port for r in fleet.client_replicas("8")] == [9300, 9310]


def test_a_client_whose_groups_all_go_through_gateways_does_not_poll_the_control_apis() -> None:
    from model_server.client.control_listener import control_view_for

    entries = GATEWAYS + '\n[[gateways]]\ngroup = "7"\nport = 9310\n'
    fleet = parse_fleet(f"[launch]\ncontrol_port = 9400\n{entries}{SERVERS}", source="<t>")
    assert control_view_for(fleet, fleet.client, lambda: 0.0) is not None
    both = ClientPolicy(through_gateway=("8", "7"))
    assert control_view_for(fleet, both, lambda: 0.0) is None
    assert control_view_for(fleet, ClientPolicy(through_gateway=("8",)), lambda: 0.0) is not None


def test_the_view_of_a_client_speaks_only_for_the_replicas_it_sends_to_itself() -> None:
    from model_server.client.control_listener import control_view_for
    from model_server.common.control_status import Recorded

    fleet = parse_fleet(f"[launch]\ncontrol_port = 9400\n{GATEWAYS}{SERVERS}", source="<t>")
    view = control_view_for(fleet, ClientPolicy(through_gateway=("8",)), lambda: 0.0)
    assert view is not None
    view.heard("127.0.0.1", {"8-0": Recorded("DRAINING"), "7-0": Recorded("DRAINING")})
    assert view.held_out(["8-0", "7-0"]) == {"7-0"}  # group 8's replicas are the gateway's business
