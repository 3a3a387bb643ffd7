"""Which servers of the table belong to this machine.

The original matched the IPv4 address of one interface (``eno1``) and failed on
machines named otherwise; here every interface address counts, plus the
hostname, plus ``--host-ip``. Loopback names are always local.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

from model_server.config import Fleet, ServerSpec
from model_server.errors import LaunchError

__all__ = ["ALWAYS_LOCAL", "local_identities", "match_servers", "select_local_servers"]

ALWAYS_LOCAL = frozenset({"127.0.0.1", "localhost", "::1", "localhost.localdomain"})


def _norm(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.split("%", 1)[0]  # fe80::1%eth0 -> fe80::1


def local_identities(host_ip: Iterable[str] = ()) -> frozenset[str]:
    """This machine's names: every interface address (psutil), hostname, loopback, ``host_ip``."""
    import psutil  # noqa: PLC0415 - only the launcher needs it

    names = set(ALWAYS_LOCAL)
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family in (socket.AF_INET, socket.AF_INET6) and a.address:
                names.add(_norm(a.address))
    # Not getfqdn(): it asks DNS with no timeout and can stall `serve` on a host with broken DNS.
    hostname = _norm(socket.gethostname())
    if hostname:
        names.update((hostname, hostname.split(".", 1)[0]))
    names.update(_norm(h) for h in host_ip if h)
    return frozenset(names)


def match_servers(servers: Iterable[ServerSpec], identities: frozenset[str]) -> tuple[ServerSpec, ...]:
    """Pure: the servers whose host is one of ``identities`` (case-insensitive)."""
    return tuple(s for s in servers if _norm(s.host) in identities)


def select_local_servers(
    fleet: Fleet, host_ip: Iterable[str] = (), identities: frozenset[str] | None = None
) -> tuple[ServerSpec, ...]:
    """This host's servers; none is a LaunchError listing the table's hosts and this machine's addresses."""
    ids = identities if identities is not None else local_identities(host_ip)
    if identities is not None:
        ids = ids | frozenset(_norm(h) for h in host_ip if h)
    mine = match_servers(fleet.servers, ids)
    if not mine:
        table_hosts = sorted({s.host for s in fleet.servers})
        shown = sorted(i for i in ids if i not in ALWAYS_LOCAL)
        raise LaunchError(
            f"{fleet.source}: no server of the table runs on this machine. The table's hosts are "
            f"{', '.join(table_hosts)}; this machine is {', '.join(shown) or '(no addresses found)'} "
            f"(and 127.0.0.1/localhost). Fix the servers' 'host', or pass --host-ip with the address "
            f"the table uses for this machine."
        )
    return mine
