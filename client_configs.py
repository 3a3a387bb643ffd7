"""The original research script's names, now read from the fleet table.

``Server``, ``Completion_Servers`` and ``Embedding_Servers`` come from
``$MODEL_SERVER_CONFIG`` (default ``configs/servers.toml``) when this module
is imported, so code written against the original keeps working; new code
should use :class:`model_server.ModelServer` and :func:`model_server.load_fleet`.

The probe helpers keep the original's names and return values, on top of
:mod:`model_server.client.probe`: every server is probed at once (one small request
each, under ``initial_latency`` seconds) instead of one after the other, and
nothing is printed; results are returned and logged.
"""

from __future__ import annotations

import logging
import math
from collections import namedtuple

from model_server.client.probe import probe_group
from model_server.config import Fleet, ServerKind, ServerSpec, load_fleet

__all__ = [
    "INF",
    "Server",
    "Completion_Servers",
    "Embedding_Servers",
    "get_all_latency",
    "get_fastest_server",
    "get_running_server_sizes",
    "servers_from_fleet",
]

log = logging.getLogger("client_configs")

INF = 200  # the original's "no server answered" latency

Server = namedtuple("Server", ["ip", "port", "model_size", "model_path", "gpus"])


def _as_server(s: ServerSpec) -> Server:
    return Server(s.host, s.port, s.group, s.model, ",".join(map(str, s.gpus)))


def servers_from_fleet(fleet: Fleet, kind: ServerKind) -> list[Server]:
    """The table's servers of one kind as the original's namedtuples (gpus as "1,2")."""
    return [_as_server(s) for s in fleet.servers if s.kind == kind]


_FLEET = load_fleet()
Completion_Servers = servers_from_fleet(_FLEET, ServerKind.completion)
Embedding_Servers = servers_from_fleet(_FLEET, ServerKind.embedding)


def _specs(fleet: Fleet, test_embedding_servers: bool, model_size: str | None = None) -> list[ServerSpec]:
    kind = ServerKind.embedding if test_embedding_servers else ServerKind.completion
    return [s for s in fleet.servers if s.kind == kind and (model_size is None or s.group == str(model_size))]


def get_fastest_server(
    initial_latency: float = 10,
    model_size: str = "8",
    test_embedding_servers: bool = False,
    *,
    fleet: Fleet | None = None,
) -> tuple[Server | None, float]:
    """``(server, latency_s)`` of the fastest server of that size answering within ``initial_latency`` s.

    ``(None, INF)`` if none answers in time.
    """
    fleet = fleet or _FLEET
    specs = _specs(fleet, test_embedding_servers, model_size)
    results = probe_group(
        specs, float(initial_latency), api_key=fleet.api_key(), connect_timeout_s=fleet.client.connect_timeout_s
    )
    answered = [r for r in results if r.usable]
    if not answered:
        log.warning(
            "no %s server of size %s answered within %s s",
            "embedding" if test_embedding_servers else "completion",
            model_size,
            initial_latency,
        )
        return None, INF
    best = min(answered, key=lambda r: r.latency_s or math.inf)
    return _as_server(best.spec), float(best.latency_s or 0.0)


def get_all_latency(
    test_embedding_servers: bool = False, *, initial_latency: float = 10, fleet: Fleet | None = None
) -> dict[Server, float]:
    """Every completion (or embedding) server's probe latency in seconds; INF for one that did not answer."""
    fleet = fleet or _FLEET
    specs = _specs(fleet, test_embedding_servers)
    out: dict[Server, float] = {}
    for r in probe_group(
        specs, float(initial_latency), api_key=fleet.api_key(), connect_timeout_s=fleet.client.connect_timeout_s
    ):
        server = _as_server(r.spec)
        out[server] = float(r.latency_s) if r.usable else INF
        if r.usable:
            log.info("%s:%s (size %s): %.3f s", server.ip, server.port, server.model_size, r.latency_s)
        else:
            log.info(
                "%s:%s (size %s): no answer (%s)", server.ip, server.port, server.model_size, r.rejected or r.error
            )
    return out


def get_running_server_sizes(*, fleet: Fleet | None = None) -> list[str]:
    """The model sizes (groups) of the tables, completion servers first, each once."""
    fleet = fleet or _FLEET
    servers = servers_from_fleet(fleet, ServerKind.completion) + servers_from_fleet(fleet, ServerKind.embedding)
    return list(dict.fromkeys(s.model_size for s in servers))
