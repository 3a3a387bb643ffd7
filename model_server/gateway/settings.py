"""A ``[[gateways]]`` entry + the rest of the fleet table -> the exact settings of one gateway. Pure.

:func:`resolve` fills every knob the entry leaves out from the table where a
setting means the same thing, else leaves the gateway's own default, and
records where each value came from (``--dry-run`` prints it):

=============================  ==========================================
gateway setting                default taken from
=============================  ==========================================
retry_max_retries              [client] max_retry (attempts, first included)
retry_initial_backoff_ms       [client] retry_backoff_initial_ms
retry_max_backoff_ms           [client] retry_backoff_max_ms
cb_failure_threshold           [client] breaker_failures
cb_timeout_duration_secs       [client] breaker_cooldown_s
request_timeout_secs           [client] request_timeout_ceiling_s
health_check_interval_secs     [launch] health_interval_s
health_failure_threshold       [launch] health_failures_to_restart
worker_startup_timeout_secs    [launch] startup_timeout_s
shutdown_grace_period_secs     the entry's stop_grace_s, else [launch] stop_grace_s
prometheus_host / _port        the gateway's host / port + 1
=============================  ==========================================

(The gateway takes whole seconds and milliseconds: a fraction is rounded up.)

Keys. The engines' key comes from the table's ``api_key_env``; the gateway's
own key (what its clients send) from the entry's ``api_key_env``, by default
the same variable. The gateway uses its own key with the workers it is given
on its command line, so when the two keys are one (or the engines have none)
the workers go on its command line; when they differ, the supervisor
registers them through ``POST /workers`` with the engines' key once the
gateway answers (:attr:`GatewaySettings.workers_on_command_line`). Neither key
is ever in these settings: only the names of their variables.

The worker list. With ``[launch] control_port`` (and ``sync_interval_s`` >
0) the gateway's list follows the pipelines' control APIs: only the READY
replicas are workers (:attr:`GatewaySettings.control`, see
:mod:`model_server.gateway.sync`); without it, the list is the group's
replicas in the table, and the gateway's own health checks decide.

:func:`validate` checks what needs the whole table: the group exists, no port
is used twice on a host, ``power_of_two`` has two workers at start, the
worker list hears of a drain before the drained replica stops.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_server.common.control_status import read_timeout_s
from model_server.common.urls import reachable_host, server_url
from model_server.config import Fleet, LaunchPolicy
from model_server.errors import ConfigError
from model_server.gateway.sync import Replica
from model_server.gateway_table import GatewayPolicy, GatewaySpec

__all__ = [
    "PINNED_VERSION",
    "ControlSync",
    "GatewaySettings",
    "log_name",
    "problems",
    "resolve",
    "select",
    "validate",
]

PINNED_VERSION = "0.3.2"  # sglang-router: the version these settings and tests were read off (pyproject's [gateway])


def _ceil(value: float) -> int:
    return max(1, math.ceil(value))


@dataclass(frozen=True)
class ControlSync:
    """How a gateway's worker list follows the pipelines' control APIs (``GET /status`` of each host)."""

    interval_s: float
    timeout_s: float  # one read of one host's control API
    launch: LaunchPolicy  # control_port and control_key_env: where to read, and which key to send
    replicas: tuple[Replica, ...]  # the group's, in table order

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.host for r in self.replicas))

    def describe(self) -> dict[str, Any]:
        return {
            "every_s": self.interval_s,
            "read_timeout_s": self.timeout_s,
            "control_apis": [server_url(h, self.launch.control_port or 0, "/status") for h in self.hosts],
            "control_key": f"from ${self.launch.control_key_env} when set" if self.launch.control_key_env else None,
        }


@dataclass(frozen=True)
class GatewaySettings:
    """Everything one gateway is started and supervised with. No secret: only variable names."""

    name: str
    group: str
    host: str
    port: int
    policy: str
    workers: tuple[str, ...]  # the group's replicas, as the gateway reaches them
    workers_on_command_line: bool  # else registered through POST /workers after it starts
    gateway_key_env: str | None
    worker_key_env: str | None
    router: Mapping[str, Any]  # sglang_router's RouterArgs fields, api_key excepted
    worker_health: Mapping[str, int]  # the health settings sent with POST /workers, as the command line sets them
    log_file: str
    startup_timeout_s: float
    liveness_interval_s: float
    liveness_timeout_s: float
    liveness_failures_to_restart: int
    restart_backoff_initial_s: float
    restart_backoff_max_s: float
    max_restarts: int
    restart_window_s: float
    stop_grace_s: float
    client_url: str  # where clients reach it (client_host, else host; a wildcard means loopback)
    sources: Mapping[str, str] = field(default_factory=dict)  # router setting -> where its value came from
    control: ControlSync | None = None  # None: the static list of the table (no control_port, or sync_interval_s 0)

    @property
    def probe_host(self) -> str:
        """Where this machine reaches the gateway: a wildcard bind address means loopback."""
        return reachable_host(self.host)

    @property
    def url(self) -> str:
        return server_url(self.probe_host, self.port)

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL clients use."""
        return self.url + "/v1"

    @property
    def metrics_url(self) -> str:
        host = self.router["prometheus_host"]
        return server_url(reachable_host(host), self.router["prometheus_port"], "/metrics")

    def summary(self) -> str:
        """One line for ``model-server check``."""
        how = "on its command line" if self.workers_on_command_line else "through its worker API"
        key = f"its key from ${self.gateway_key_env}" if self.gateway_key_env else "no key"
        follows = (
            f"the READY ones per the control APIs, read every {self.control.interval_s:g} s"
            if self.control
            else "all of them (static: no control API followed)"
        )
        return (
            f"gateway {self.name}: group {self.group} on {self.base_url} ({self.policy}), "
            f"{len(self.workers)} worker(s) registered {how}, {key}, metrics {self.metrics_url}; its workers: {follows}"
        )

    def describe(self) -> dict[str, Any]:
        """The settings as ``--dry-run`` prints them (JSON-able; no secret)."""
        return {
            "name": self.name,
            "group": self.group,
            "url": self.base_url,
            "clients_reach_it_at": self.client_url + "/v1",
            "metrics": self.metrics_url,
            "policy": self.policy,
            "workers": list(self.workers),
            "workers_registered": "on its command line (--worker-urls)"
            if self.workers_on_command_line
            else "through POST /workers once it answers (its key differs from the engines' key)",
            "api_key": f"from ${self.gateway_key_env}" if self.gateway_key_env else None,
            "worker_api_key": f"from ${self.worker_key_env}" if self.worker_key_env else None,
            "router_args": dict(self.router),
            "worker_health": dict(self.worker_health),
            "worker_list": {"follows_the_control_plane": self.control.describe()}
            if self.control
            else "static: every replica of the group (no launch.control_port, or sync_interval_s = 0)",
            "defaults_from": dict(self.sources),
            "log_file": self.log_file,
            "supervision": {
                "startup_timeout_s": self.startup_timeout_s,
                "liveness": f"GET /liveness every {self.liveness_interval_s:g} s, "
                f"{self.liveness_timeout_s:g} s timeout, "
                f"{self.liveness_failures_to_restart} failures in a row mean hung",
                "restart_backoff_s": [self.restart_backoff_initial_s, self.restart_backoff_max_s],
                "max_restarts": self.max_restarts,
                "restart_window_s": self.restart_window_s,
                "stop_grace_s": self.stop_grace_s,
            },
        }


def log_name(name: str) -> str:
    """The gateway's log file in [launch] log_dir: ``gateway-8.log`` (its name says it is a gateway's)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return f"{safe}.log" if safe.startswith("gateway") else f"gateway-{safe}.log"


def _pick(spec: GatewaySpec, key: str, default: Any, source: str, sources: dict[str, str]) -> Any:
    value = getattr(spec, key)
    if value is None:
        sources[key] = source
        return default
    return value


def resolve(fleet: Fleet, spec: GatewaySpec) -> GatewaySettings:
    """The exact settings of ``spec`` in ``fleet``: the entry's values, the rest derived (see the module's table)."""
    client, launch = fleet.client, fleet.launch
    sources: dict[str, str] = {}
    stop_grace_s = _pick(spec, "stop_grace_s", launch.stop_grace_s, "[launch] stop_grace_s", sources)
    prometheus_port = spec.prometheus_port if spec.prometheus_port is not None else spec.port + 1
    if spec.prometheus_port is None:
        sources["prometheus_port"] = "the gateway's port + 1"
    router: dict[str, Any] = {
        "host": spec.host,
        "port": spec.port,
        "policy": spec.policy.value,
        "prometheus_host": spec.prometheus_host or spec.host,
        "prometheus_port": prometheus_port,
        "log_level": spec.log_level,
        "retry_max_retries": _pick(
            spec, "retry_max_retries", min(client.max_retry, 1000), "[client] max_retry", sources
        ),
        "retry_initial_backoff_ms": _pick(
            spec,
            "retry_initial_backoff_ms",
            _ceil(client.retry_backoff_initial_ms),
            "[client] retry_backoff_initial_ms",
            sources,
        ),
        "retry_max_backoff_ms": _pick(
            spec, "retry_max_backoff_ms", _ceil(client.retry_backoff_max_ms), "[client] retry_backoff_max_ms", sources
        ),
        "disable_retries": spec.disable_retries,
        "cb_failure_threshold": _pick(
            spec, "cb_failure_threshold", client.breaker_failures, "[client] breaker_failures", sources
        ),
        "cb_timeout_duration_secs": _pick(
            spec, "cb_timeout_duration_secs", _ceil(client.breaker_cooldown_s), "[client] breaker_cooldown_s", sources
        ),
        "disable_circuit_breaker": spec.disable_circuit_breaker,
        "health_check_endpoint": spec.health_check_endpoint,
        "health_check_interval_secs": _pick(
            spec, "health_check_interval_secs", _ceil(launch.health_interval_s), "[launch] health_interval_s", sources
        ),
        "health_failure_threshold": _pick(
            spec,
            "health_failure_threshold",
            launch.health_failures_to_restart,
            "[launch] health_failures_to_restart",
            sources,
        ),
        "request_timeout_secs": _pick(
            spec,
            "request_timeout_secs",
            _ceil(client.request_timeout_ceiling_s),
            "[client] request_timeout_ceiling_s",
            sources,
        ),
        "max_concurrent_requests": spec.max_concurrent_requests,
        "worker_startup_timeout_secs": _pick(
            spec, "worker_startup_timeout_secs", _ceil(launch.startup_timeout_s), "[launch] startup_timeout_s", sources
        ),
        "shutdown_grace_period_secs": _ceil(stop_grace_s),
    }
    # One may come from [client] and the other from the entry: the gateway requires max >= initial.
    router["retry_max_backoff_ms"] = max(router["retry_max_backoff_ms"], router["retry_initial_backoff_ms"])
    for key in (  # the gateway's own defaults unless the entry sets them
        "cache_threshold", "balance_abs_threshold", "balance_rel_threshold", "eviction_interval_secs", "max_tree_size",
        "retry_backoff_multiplier", "retry_jitter_factor", "cb_success_threshold", "cb_window_duration_secs",
        "health_check_timeout_secs", "health_success_threshold", "queue_size", "queue_timeout_secs",
    ):  # fmt: skip
        value = getattr(spec, key)
        if value is not None:
            router[key] = value
    worker_key_env = fleet.api_key_env
    gateway_key_env = spec.api_key_env or worker_key_env
    servers = fleet.group(spec.group)
    worker_health = {
        "health_check_interval_secs": router["health_check_interval_secs"],
        "health_failure_threshold": router["health_failure_threshold"],
        "health_check_timeout_secs": router.get("health_check_timeout_secs", 5),  # the gateway's default
        "health_success_threshold": router.get("health_success_threshold", 2),
    }
    control = None
    if launch.control_port is not None and spec.sync_interval_s > 0:
        replicas = tuple(Replica(s.name, s.host, server_url(s.host, s.port)) for s in servers)
        control = ControlSync(spec.sync_interval_s, read_timeout_s(spec.sync_interval_s), launch, replicas)
    return GatewaySettings(
        name=spec.name,
        group=spec.group,
        host=spec.host,
        port=spec.port,
        policy=spec.policy.value,
        workers=tuple(server_url(s.host, s.port) for s in servers),
        workers_on_command_line=worker_key_env is None or gateway_key_env == worker_key_env,
        gateway_key_env=gateway_key_env,
        worker_key_env=worker_key_env,
        router=router,
        worker_health=worker_health,
        log_file=str(Path(launch.log_dir).absolute() / log_name(spec.name)),
        client_url=spec.client_url,
        startup_timeout_s=spec.startup_timeout_s,
        liveness_interval_s=_pick(
            spec, "liveness_interval_s", launch.health_interval_s, "[launch] health_interval_s", sources
        ),
        liveness_timeout_s=spec.liveness_timeout_s,
        liveness_failures_to_restart=_pick(
            spec,
            "liveness_failures_to_restart",
            launch.health_failures_to_restart,
            "[launch] health_failures_to_restart",
            sources,
        ),
        restart_backoff_initial_s=_pick(
            spec,
            "restart_backoff_initial_s",
            launch.restart_backoff_initial_s,
            "[launch] restart_backoff_initial_s",
            sources,
        ),
        restart_backoff_max_s=_pick(
            spec, "restart_backoff_max_s", launch.restart_backoff_max_s, "[launch] restart_backoff_max_s", sources
        ),
        max_restarts=_pick(spec, "max_restarts", launch.max_restarts, "[launch] max_restarts", sources),
        restart_window_s=_pick(spec, "restart_window_s", launch.restart_window_s, "[launch] restart_window_s", sources),
        stop_grace_s=stop_grace_s,
        sources=sources,
        control=control,
    )


def _label(spec: GatewaySpec, i: int | None) -> str:
    return f"gateway '{spec.name}'" + (f" (gateways[{i}])" if i is not None else "")


def _spec_problems(fleet: Fleet, spec: GatewaySpec, settings: GatewaySettings, label: str) -> list[str]:
    out: list[str] = []
    servers = fleet.group(spec.group)
    if not servers:
        return [f"{label}: field 'group' is '{spec.group}', and the table has no such group; the groups are: "
                f"{', '.join(sorted(fleet.groups))}. Name one of them"]  # fmt: skip
    if spec.port + 1 > 65535 and spec.prometheus_port is None:
        out.append(
            f"{label}: field 'port' is {spec.port}, so the default prometheus_port (port + 1) "
            "is out of range: set prometheus_port"
        )
    if settings.router["prometheus_port"] == spec.port and settings.router["prometheus_host"] == spec.host:
        out.append(
            f"{label}: fields 'port' and 'prometheus_port' are both {spec.port}: give the metrics their own port"
        )
    if spec.policy is GatewayPolicy.power_of_two:
        if len(servers) < 2:
            out.append(
                f"{label}: field 'policy' is power_of_two, which the gateway refuses with fewer "
                "than 2 workers, and group "
                f"'{spec.group}' has {len(servers)}: use round_robin or cache_aware, or add a replica"
            )
        elif not settings.workers_on_command_line:
            out.append(
                f"{label}: field 'policy' is power_of_two, which needs its workers on the "
                "gateway's command line; the gateway "
                f"sends its own key (${settings.gateway_key_env}) to those, and the engines "
                f"expect ${settings.worker_key_env}. "
                f"Give the gateway the engines' key (remove its api_key_env), or use round_robin or cache_aware"
            )
    out += _sync_problems(fleet, spec, label)
    return out


def _sync_problems(fleet: Fleet, spec: GatewaySpec, label: str) -> list[str]:
    launch, every = fleet.launch, spec.sync_interval_s
    if launch.control_port is None:
        if "sync_interval_s" in spec.model_fields_set and every > 0:
            return [
                f"{label}: field 'sync_interval_s' is {every:g}, and the table has no launch.control_port, so there "
                f"is no control API to follow: set launch.control_port (the pipelines serve it), or remove "
                f"sync_interval_s"
            ]
        return []
    if every > 0 and every >= launch.drain_notice_s:
        return [
            f"{label}: field 'sync_interval_s' is {every:g} s, not below launch.drain_notice_s "
            f"({launch.drain_notice_s:g} s), so a drained replica could stop before the gateway hears of it, and "
            f"the requests it sends there meanwhile fail. Lower sync_interval_s, raise launch.drain_notice_s, or "
            f"set sync_interval_s = 0 for a static worker list"
        ]
    return []


def _ports_problems(fleet: Fleet, all_settings: Sequence[tuple[str, GatewaySettings]]) -> list[str]:
    """No (host, port) twice among the gateways, their metrics ports, the servers and the control APIs."""
    out: list[str] = []
    owner: dict[tuple[str, int], str] = {(s.host, s.port): f"server '{s.name}'" for s in fleet.servers}
    if fleet.launch.control_port is not None:
        for s in fleet.servers:
            owner.setdefault((s.host, fleet.launch.control_port), f"the control API of host {s.host}")
    for label, st in all_settings:
        for what, host, port in (
            ("port", st.host, st.port),
            ("prometheus_port", st.router["prometheus_host"], st.router["prometheus_port"]),
        ):
            key = (host, port)
            if key in owner:
                out.append(
                    f"{label}: field '{what}' uses {host}:{port}, already used by {owner[key]}: give it another port"
                )
            else:
                owner[key] = f"{label} ({what})"
    return out


def problems(fleet: Fleet, specs: Sequence[GatewaySpec] | None = None) -> list[str]:
    """Every problem of the table's gateways (or of ``specs``), one sentence each; empty when all is well."""
    out: list[str] = []
    given = fleet.gateways if specs is None else tuple(specs)
    from_table = specs is None
    seen: dict[str, int] = {}
    all_settings: list[tuple[str, GatewaySettings]] = []
    for i, spec in enumerate(given):
        label = _label(spec, i if from_table else None)
        if spec.name in seen:
            out.append(
                f"{label}: field 'name' repeats the name of gateways[{seen[spec.name]}], and names must be unique"
            )
        seen.setdefault(spec.name, i)
        settings = resolve(fleet, spec)
        out += _spec_problems(fleet, spec, settings, label)
        all_settings.append((label, settings))
    out += _ports_problems(fleet, all_settings)
    return out


def validate(fleet: Fleet, specs: Sequence[GatewaySpec] | None = None) -> tuple[GatewaySettings, ...]:
    """The settings of every gateway of the table (or of ``specs``); ConfigError naming every problem."""
    found = problems(fleet, specs)
    if found:
        raise ConfigError(
            f"{fleet.source}: invalid [[gateways]]: "
            + "; ".join(found)
            + ". Fix this and run `model-server check` again."
        )
    given = fleet.gateways if specs is None else tuple(specs)
    return tuple(resolve(fleet, s) for s in given)


def select(fleet: Fleet, groups: Sequence[str] = (), port: int | None = None) -> tuple[GatewaySettings, ...]:
    """The gateways ``model-server gateway --group G ... --port P`` starts.

    No ``groups``: every ``[[gateways]]`` entry. A group with no entry gets a
    default one if ``port`` is given. ``port`` needs exactly one gateway.
    """
    wanted = [str(g).strip() for g in groups]
    unknown = [g for g in wanted if not fleet.group(g)]
    if unknown:
        raise ConfigError(
            f"{fleet.source}: --group {unknown[0]} names no group of the table; the groups are: "
            f"{', '.join(sorted(fleet.groups))}. Name one of them"
        )
    if not wanted:
        specs = list(fleet.gateways)
        if not specs:
            raise ConfigError(
                f"{fleet.source}: the table has no [[gateways]] section, so there is no gateway to start. Add one "
                f'(group = "<group>", port = <port>), or pass --group <group> --port <port>'
            )
    else:
        specs = []
        for g in dict.fromkeys(wanted):
            entries = [s for s in fleet.gateways if s.group == g]
            if entries:
                specs += entries
            elif port is not None:
                specs.append(GatewaySpec(group=g, port=port))
            else:
                raise ConfigError(
                    f"{fleet.source}: group '{g}' has no [[gateways]] entry in the table: add one (group = \"{g}\", "
                    f"port = <port>), or pass --port <port> to start one with the defaults"
                )
    if port is not None:
        if len(specs) != 1:
            raise ConfigError(
                f"{fleet.source}: --port {port} sets the port of one gateway, and {len(specs)} are selected "
                f"({', '.join(s.name for s in specs)}): pass one --group, or set each port in the table"
            )
        specs = [specs[0].model_copy(update={"port": port})]
    return validate(fleet, specs)
