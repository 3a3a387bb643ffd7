"""The original research script's names, now read from the fleet table.

``Server``, ``Completion_Servers`` and ``Embedding_Servers`` come from
``$MODEL_SERVER_CONFIG`` (default ``configs/servers.toml``) when this module
is imported, so code written against the original keeps working; new code
should use :class:`model_server.ModelServer` and :func:`model_server.load_fleet`.
"""

from __future__ import annotations

from collections import namedtuple

from model_server.config import Fleet, ServerKind, load_fleet

__all__ = ["Server", "Completion_Servers", "Embedding_Servers", "servers_from_fleet"]

Server = namedtuple("Server", ["ip", "port", "model_size", "model_path", "gpus"])


def servers_from_fleet(fleet: Fleet, kind: ServerKind) -> list[Server]:
    """The table's servers of one kind as the original's namedtuples (gpus as "1,2")."""
    return [
        Server(s.host, s.port, s.group, s.model, ",".join(map(str, s.gpus)))
        for s in fleet.servers
        if s.kind == kind
    ]


_FLEET = load_fleet()
Completion_Servers = servers_from_fleet(_FLEET, ServerKind.completion)
Embedding_Servers = servers_from_fleet(_FLEET, ServerKind.embedding)
