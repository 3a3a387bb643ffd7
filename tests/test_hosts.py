"""Host matching: interface addresses, hostname, --host-ip; loopback always local."""

from __future__ import annotations

import socket

import pytest

from model_server.common.hosts import local_identities, match_servers, select_local_servers
from model_server.config import parse_fleet
from model_server.errors import LaunchError

TABLE = """
[[servers]]
name = "a"
group = "8"
kind = "completion"
host = "10.9.8.7"
port = 8000
model = "m"

[[servers]]
name = "b"
group = "8"
kind = "completion"
host = "GPU-Node-2"
port = 8001
model = "m"

[[servers]]
name = "c"
group = "8"
kind = "completion"
host = "localhost"
port = 8002
model = "m"
"""


def names(servers) -> list[str]:
    return [s.name for s in servers]


def test_match_is_by_address_or_name_case_insensitive() -> None:
    fleet = parse_fleet(TABLE)
    assert names(match_servers(fleet.servers, frozenset({"10.9.8.7"}))) == ["a"]
    assert names(match_servers(fleet.servers, frozenset({"gpu-node-2"}))) == ["b"]
    assert names(match_servers(fleet.servers, frozenset())) == []


def test_this_machine_knows_its_addresses_and_name() -> None:
    ids = local_identities()
    assert {"127.0.0.1", "localhost"} <= ids
    assert socket.gethostname().lower() in ids
    assert "203.0.113.5" in local_identities(["203.0.113.5"])


def test_loopback_is_always_local_and_host_ip_adds() -> None:
    fleet = parse_fleet(TABLE)
    assert names(select_local_servers(fleet, identities=frozenset({"127.0.0.1", "localhost"}))) == ["c"]
    assert names(select_local_servers(fleet, ["10.9.8.7"], identities=frozenset({"localhost"}))) == ["a", "c"]


def test_no_match_lists_table_hosts_and_machine_addresses() -> None:
    fleet = parse_fleet(TABLE.replace('"localhost"', '"10.1.1.1"'), source="t.toml")
    with pytest.raises(LaunchError) as info:
        select_local_servers(fleet, identities=frozenset({"127.0.0.1", "192.168.50.4", "box"}))
    message = str(info.value)
    assert message.startswith("t.toml: no server of the table runs on this machine")
    for host in ("10.9.8.7", "GPU-Node-2", "10.1.1.1", "192.168.50.4", "box", "--host-ip"):
        assert host in message
