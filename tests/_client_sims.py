"""Helpers for the client's real-process tests: simulated replicas and a fleet table naming them."""

from __future__ import annotations

import functools
import re
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import psutil
from _waiting import wait_for  # noqa: F401 - the client tests import it from here

from model_server.config import Fleet, parse_fleet
from model_server.sim.process import SimProcess, free_port

# Millisecond latencies keep hundreds of requests within seconds on a shared 2-core box.
FAST_ARGS = ("--ttft-ms", "5", "--tpot-ms", "1", "--tpot-growth", "0.01")

# Short timeouts and cooldowns: a hung replica costs request_timeout = 0.5 x 4 = 2 s per attempt.
TEST_POLICY = {
    "initial_latency_s": 0.5,
    "probe_bound_growth": 4,
    "degraded_latency_factor": 4,
    "request_timeout_floor_s": 0.5,
    "request_timeout_ceiling_s": 4,
    "connect_timeout_s": 1,
    "retry_backoff_initial_ms": 5,
    "retry_backoff_max_ms": 50,
    "breaker_failures": 3,
    "breaker_cooldown_s": 60,
    "max_retry": 10,
    "build_rounds": 2,
    "reprobe_interval_s": 1,
    "wait_for_replica_s": 3,  # a dead group fails in seconds, not the default minute
}

MESSAGES = [{"role": "user", "content": "Name a colour."}]


def start_sims(n: int, *, embedding: bool = False, args: Sequence[str] = FAST_ARGS) -> list[SimProcess]:
    """n simulated replicas on free ports, started concurrently."""
    sims = [
        SimProcess(
            model_path="sim/test-model",
            served_model_name="emb" if embedding else "chat",
            embedding=embedding,
            args=tuple(args),
        )
        for _ in range(n)
    ]
    try:
        for s in sims:
            s.start(wait=False)
        for s in sims:
            s.wait_ready(30)
    except BaseException:
        stop_sims(sims)
        raise
    return sims


def stop_sims(sims: Sequence[SimProcess]) -> None:
    pids = [s.pid for s in sims if s.pid]
    for s in sims:
        s.stop(grace_s=3)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


@contextmanager
def sims_running(n: int, **kw) -> Iterator[list[SimProcess]]:
    sims = start_sims(n, **kw)
    try:
        yield sims
    finally:
        stop_sims(sims)


def fleet_of(
    groups: dict[str, tuple[str, Sequence[int]]],
    *,
    routing: str = "fastest",
    control_port: int | None = None,
    **policy: object,
) -> Fleet:
    """A fleet table: {group: (kind, ports)}; replicas named <group>-<i>; TEST_POLICY with overrides.

    ``control_port``: the table's ``launch.control_port`` (the client then listens to a control API there).
    """
    fields = dict(TEST_POLICY, **policy)
    lines = [f"[launch]\ncontrol_port = {control_port}"] if control_port is not None else []
    lines += ["[client]", f'routing = "{routing}"']
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, bool):
            lines.append(f"{key} = {str(value).lower()}")
        else:
            lines.append(f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}")
    return parse_fleet("\n".join(lines) + "\n" + servers_toml(groups), source="<test fleet>")


def servers_toml(groups: dict[str, tuple[str, Sequence[int]]], *, gpus: bool = False) -> str:
    """The ``[[servers]]`` entries of {group: (kind, ports)}: replicas named <group>-<i> (one GPU each with ``gpus``)."""
    lines: list[str] = []
    gpu = 0
    for group, (kind, ports) in groups.items():
        model = "emb" if kind == "embedding" else "chat"
        for i, port in enumerate(ports):
            gpu += 1
            lines += [
                "",
                "[[servers]]",
                f'name = "{group}-{i}"',
                f'group = "{group}"',
                f'kind = "{kind}"',
                'host = "127.0.0.1"',
                f"port = {port}",
                'model = "sim/test-model"',
                f'served_model_name = "{model}"',
                *([f"gpus = [{gpu}]"] if gpus else []),
            ]
    return "\n".join(lines) + "\n"


def rehost(toml: str, hosts: dict[str, str]) -> str:
    """``servers_toml`` text with the named servers moved to other hosts ({name: host})."""
    for name, host in hosts.items():
        pattern = rf'(name = "{re.escape(name)}"\n(?:[^\[\n].*\n)*?)host = "[^"]*"'
        toml, n = re.subn(pattern, rf'\1host = "{host}"', toml)
        assert n == 1, name
    return toml


@functools.cache
def firewalled_port() -> int:
    """A port on 127.0.0.1 that takes connections and never answers (nothing accepts them): a firewalled or hung
    control API. The socket stays open for the whole test session."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    _FIREWALLED.append(sock)
    return sock.getsockname()[1]


_FIREWALLED: list[socket.socket] = []


def dead_ports(n: int) -> list[int]:
    """Free ports nobody listens on: replicas that refuse every connection."""
    return [free_port() for _ in range(n)]


def chat_chunk(
    content: str | None = None, *, role: bool = False, finish: str | None = None, usage: tuple[int, int] | None = None
) -> dict:
    """One chat.completion.chunk event as SGLang streams it (usage: (prompt, completion) tokens so far)."""
    delta: dict = {"role": "assistant", "content": ""} if role else {}
    if content is not None:
        delta["content"] = content
    event: dict = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "chat",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        event["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}
    return event


def fleet_with_firewalled_control(groups: dict[str, tuple[str, Sequence[int]]], **kw: object) -> Fleet:
    """:func:`fleet_of` with a control API that never answers (issue 12): every result must stay what it is
    without one, since the client never depends on the control plane. Asserts the client does listen there."""
    from model_server.client.control_listener import control_view_for

    fleet = fleet_of(groups, control_port=firewalled_port(), control_refresh_s=0.2, **kw)
    assert control_view_for(fleet, fleet.client, lambda: 0.0) is not None, "the client would not listen to it"
    return fleet
