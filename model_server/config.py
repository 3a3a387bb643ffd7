"""The fleet table: TOML in ``configs/`` -> validated, frozen pydantic models.

One file describes every server of the fleet (all hosts), the launch policy
every host applies, the client policy applications use, and the *name* of the
environment variable holding the API key (never the key). Both halves read it
through :func:`load_fleet`, so a mistake is caught once, with a message that
names the file, the server and the field.
"""

from __future__ import annotations

import os
import re
import reprlib
import sys
from collections import defaultdict
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from model_server.common.urls import server_url
from model_server.errors import ConfigError
from model_server.gateway_table import MIN_SYNC_INTERVAL_S, GatewaySpec, GroupName

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "CONFIG_ENV",
    "PROJECT_ROOT",
    "ClientPolicy",
    "Fleet",
    "GpuInventoryConfig",
    "LaunchPolicy",
    "MemFractionRule",
    "RoutingPolicy",
    "ServerKind",
    "ServerSpec",
    "default_config_path",
    "load_fleet",
    "parse_fleet",
]

CONFIG_ENV = "MODEL_SERVER_CONFIG"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = Path("configs") / "servers.toml"


# Upper bounds: every setting stays one a timer, a sleep and the engine's argv can hold.
_HOUR_S = 3600.0
_DAY_S = 86400.0
_MONTH_S = 30 * 86400.0
_MAX_MIB = 1 << 24  # 16 TiB per GPU
_MAX_TOKENS = (1 << 31) - 1  # SGLang's ints
_MAX_GPU_INDEX = 1023
SGLANG_MIN_HEALTH_TIMEOUT_S = 2.0
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# The bounded kinds of value the table is made of (pydantic's constraints, declared once).
Seconds = Annotated[float, Field(gt=0, le=_DAY_S)]  # a duration: positive, at most a day
Factor = Annotated[float, Field(gt=1, le=1e6)]  # a multiplier that must grow something
DEFAULT_CONTROL_KEY_ENV = "MODEL_SERVER_CONTROL_KEY"
SECRET_ENGINE_FLAGS = ("--api-key", "--admin-api-key")


def _no_nul_char(value: str) -> str:
    if "\0" in value:
        raise ValueError("contains a NUL character, which no path, host or argument can hold: remove it")
    return value


def _env_name(name: str) -> str:
    if not _ENV_NAME.match(name):
        raise ValueError(
            f"holds {_short(name)}, which is not an environment variable name "
            "(letters, digits and _, not starting with a digit)"
        )
    return name


class _Strict(BaseModel):
    """Frozen, and unknown keys are an error (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerKind(str, Enum):
    completion = "completion"
    embedding = "embedding"


class RoutingPolicy(str, Enum):
    fastest = "fastest"  # the original's: always the lowest smoothed latency
    p2c = "p2c"  # power of two choices on latency x (1 + in flight)


class ServerSpec(_Strict):
    """One server of the fleet: where it runs, what it serves, on which GPUs."""

    name: str = ""  # defaults to "<group>@<host>:<port>"
    group: str = Field(min_length=1)
    kind: ServerKind
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    model: str
    gpus: tuple[int, ...] = ()
    served_model_name: str | None = None
    args: tuple[str, ...] = ()  # extra engine arguments, appended as given

    @field_validator("group", "host", "model", mode="before")
    @classmethod
    def _strip(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value

    @field_validator("name", "group", "host", "model", "served_model_name")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        return value if value is None else _no_nul_char(value)

    @field_validator("args")
    @classmethod
    def _args_hold_no_secret(cls, args: tuple[str, ...]) -> tuple[str, ...]:
        for arg in args:
            _no_nul_char(arg)
            flag = arg.split("=", 1)[0]
            if flag in SECRET_ENGINE_FLAGS:
                raise ValueError(
                    f"has {flag}: a key on the command line is visible to every user in `ps` and lands in logs. "
                    f"Remove it, and name the variable that holds the key with api_key_env at the top of the table"
                )
        return args

    @field_validator("group", mode="before")
    @classmethod
    def _group_as_text(cls, value: Any) -> Any:
        # The original keyed groups by model size: group = 8 means "8".
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, value: str) -> str:
        if not value:
            raise ValueError("is empty: give a model directory or hub id")
        return value

    @field_validator("gpus")
    @classmethod
    def _gpus_valid(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        negative = [g for g in value if g < 0]
        if negative:
            raise ValueError(f"has negative GPU index {negative[0]}: indices are as nvidia-smi shows them (0, 1, ...)")
        huge = [g for g in value if g > _MAX_GPU_INDEX]
        if huge:
            raise ValueError(
                f"has GPU index {huge[0]}, above {_MAX_GPU_INDEX}: indices are as nvidia-smi shows them (0, 1, ...)"
            )
        repeated = sorted({g for g in value if value.count(g) > 1})
        if repeated:
            raise ValueError(f"repeats GPU index {repeated[0]}: list each GPU once")
        return value

    @model_validator(mode="after")
    def _default_name(self) -> ServerSpec:
        if not self.name:
            object.__setattr__(self, "name", f"{self.group}@{self.host}:{self.port}")
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL clients use."""
        return server_url(self.host, self.port, "/v1")

    @property
    def model_name(self) -> str:
        """The model name requests carry: the served name, else the path."""
        return self.served_model_name or self.model

    @property
    def tp_size(self) -> int:
        return max(1, len(self.gpus))


class MemFractionRule(_Strict):
    """If the lowest free ratio of the server's GPUs is >= min_free_ratio, use mem_fraction_static."""

    min_free_ratio: float = Field(gt=0, le=1)
    mem_fraction_static: float = Field(gt=0, lt=1)


class LaunchPolicy(_Strict):
    """How every host starts, watches and stops its servers.

    Every duration has an upper bound a person would still call a setting
    (an hour between GPU polls, a day to start, 30 days of waiting), so no
    value reaches a timer that cannot hold it. The health settings are
    chosen against SGLang's ``/health_generate``, which answers in about 1 s
    at best (it polls its scheduler once a second).
    """

    engine: Literal["sglang", "sim"] = "sglang"
    bind_host: str = Field(default="0.0.0.0", min_length=1)
    gpu_free_threshold_mib: int = Field(default=10000, ge=0, le=_MAX_MIB)
    gpu_poll_interval_s: float = Field(default=10.0, gt=0, le=_HOUR_S)
    gpu_wait_timeout_s: float | None = Field(default=None, gt=0, le=_MONTH_S)  # None: wait as long as it takes
    mem_fraction_policy: tuple[MemFractionRule, ...] = (
        MemFractionRule(min_free_ratio=0.95, mem_fraction_static=0.80),
        MemFractionRule(min_free_ratio=0.85, mem_fraction_static=0.70),
    )
    context_length: int | None = Field(default=131072, gt=0, le=_MAX_TOKENS)
    chunked_prefill_size: int | None = Field(default=16384, gt=0, le=_MAX_TOKENS)
    embedding_context_length: int | None = Field(default=32768, gt=0, le=_MAX_TOKENS)
    embedding_chunked_prefill_size: int | None = Field(default=4096, gt=0, le=_MAX_TOKENS)
    enable_metrics: bool = True
    startup_timeout_s: Seconds = 1800.0
    health_interval_s: float = Field(default=10.0, gt=0, le=_HOUR_S)
    health_timeout_s: float = Field(default=25.0, gt=0, le=_HOUR_S)
    health_failures_to_restart: int = Field(default=3, ge=1, le=1000)
    restart_backoff_initial_s: float = Field(default=2.0, ge=0, le=_HOUR_S)
    restart_backoff_max_s: float = Field(default=120.0, ge=0, le=_DAY_S)
    max_restarts: int = Field(default=5, ge=0, le=100000)  # in restart_window_s; more ends the server FAILED
    restart_window_s: float = Field(default=1800.0, gt=0, le=_MONTH_S)
    stop_grace_s: float = Field(default=30.0, ge=0, le=_HOUR_S)
    log_dir: str = Field(default="logs", min_length=1)
    status_file: str = Field(default="run/status.json", min_length=1)
    # Names of environment variables whose values are secrets (a hub token, say): like the API key,
    # their values never reach an engine log, the status file or a message.
    secret_env: tuple[str, ...] = ()
    # The control API (launcher/control_api.py): off unless a port is given; it listens on this host's servers'
    # address. Its write routes need the key in the variable control_key_env names (never the key itself here).
    control_port: int | None = Field(default=None, ge=1, le=65535)
    # Without the field, MODEL_SERVER_CONTROL_KEY is the variable, and the write routes are off while it is unset.
    control_key_env: str | None = DEFAULT_CONTROL_KEY_ENV
    # A drained server stops (or restarts) once its engine runs no request, or after this long at the latest.
    drain_timeout_s: Seconds = 120.0
    # A drained server keeps serving at least this long, so that clients reading the control API (every
    # client.control_refresh_s) hear of the drain before it stops: requests sent meanwhile still finish.
    drain_notice_s: float = Field(default=2.0, ge=0, le=_HOUR_S)
    # The dashboard (GET / of the control API) also shows what these clients see of each replica: the URLs of
    # their Prometheus endpoints (a ModelServer with metrics_registry=..., served by prometheus_client).
    dashboard_client_metrics: tuple[str, ...] = ()

    @field_validator("bind_host", "log_dir", "status_file", mode="before")
    @classmethod
    def _strip_text(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value

    @field_validator("bind_host", "log_dir", "status_file")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        return _no_nul_char(value)

    @field_validator("secret_env")
    @classmethod
    def _env_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            _env_name(name)
        return names

    @field_validator("dashboard_client_metrics")
    @classmethod
    def _metrics_urls(cls, urls: tuple[str, ...]) -> tuple[str, ...]:
        for url in urls:
            if not url.startswith(("http://", "https://")) or any(c.isspace() for c in url):
                raise ValueError(
                    f"has {url!r}, not a URL: give each client's metrics endpoint as http://host:port/metrics"
                )
        return urls

    @field_validator("control_key_env")
    @classmethod
    def _control_key_env_name(cls, name: str | None) -> str | None:
        return None if name is None else _env_name(name)

    def control_key(self, fix: str = "", *, required: bool | None = None) -> str | None:
        """The control API's key from the variable ``control_key_env`` names, or None.

        An unset variable is a ConfigError when ``required`` (by default: when the table names the
        variable itself; MODEL_SERVER_CONTROL_KEY, the default, may be unset: the write routes are then off).
        ``fix``: what the message tells to do (default: what a pipeline about to start needs).
        """
        if not self.control_key_env:
            return None
        value = os.environ.get(self.control_key_env, "")
        if required is None:
            required = "control_key_env" in self.model_fields_set
        if not value and required:
            named = (
                f"field 'launch.control_key_env' names the environment variable {self.control_key_env}"
                if "control_key_env" in self.model_fields_set
                else f"the control key is read from {self.control_key_env} (the default of launch.control_key_env)"
            )
            raise ConfigError(
                f"{named}, which is unset or empty in this shell, so the control API's write routes could not be "
                f"used. Fix: "
                + (fix or f"export {self.control_key_env}=<a long random key> before starting, or remove "
                   f"'control_key_env'")
            )  # fmt: skip
        return value or None

    @field_validator("mem_fraction_policy")
    @classmethod
    def _policy_sorted(cls, rules: tuple[MemFractionRule, ...]) -> tuple[MemFractionRule, ...]:
        if not rules:
            raise ValueError("is empty: give at least one {min_free_ratio, mem_fraction_static} rule")
        return tuple(sorted(rules, key=lambda r: r.min_free_ratio, reverse=True))

    @model_validator(mode="after")
    def _health_allows_health_generate(self) -> LaunchPolicy:
        if self.engine == "sglang" and self.health_timeout_s < SGLANG_MIN_HEALTH_TIMEOUT_S:
            raise ValueError(
                f"field 'launch.health_timeout_s' is {self.health_timeout_s:g} s, and SGLang's /health_generate takes "
                f"at least about 1 s to answer (it polls its scheduler once a second), so a healthy server would be "
                f"restarted as hung. Give it at least {SGLANG_MIN_HEALTH_TIMEOUT_S:g} s (configs/servers.toml uses 25)"
            )
        if self.restart_backoff_initial_s > self.restart_backoff_max_s:
            raise ValueError(
                f"field 'launch.restart_backoff_initial_s' ({self.restart_backoff_initial_s:g}) is above "
                f"launch.restart_backoff_max_s ({self.restart_backoff_max_s:g}): lower the first or raise the second"
            )
        return self


class ClientPolicy(_Strict):
    """How ModelServer finds replicas, times requests out, retries and fails over.

    Names and defaults follow the original client (LATENCY_GROWING_RATE = 20,
    an initial bound of 3 s, MAX_RETRY = 20) where it had one.
    """

    routing: RoutingPolicy = RoutingPolicy.p2c  # 1.45x fastest's throughput at 32 concurrent, equal at 1 (benchmarks)
    initial_latency_s: Seconds = 3.0
    # After a probe round in which every replica timed out, the latency bound (the probe timeout) grows
    # by this factor, never past latency_bound_max_s.
    probe_bound_growth: Factor = 20.0
    # A replica whose smoothed latency per output token grows past this x its own best is degraded:
    # routed to only when nothing better is left, and re-probed in the background.
    degraded_latency_factor: Factor = 20.0
    # The original's single knob (LATENCY_GROWING_RATE): sets both factors above unless they are given.
    # (Its third use, request timeout = rate x bound, is now the first-token and stall deadlines below.)
    latency_growing_rate: Factor | None = None
    build_rounds: int = Field(default=3, ge=1, le=1000)  # probe rounds, the bound growing each time
    max_retry: int = Field(default=20, ge=1, le=100000)  # attempts per request, fallbacks included
    request_timeout_floor_s: Seconds = 5.0
    request_timeout_ceiling_s: Seconds = 600.0
    connect_timeout_s: Seconds = 3.0
    retry_backoff_initial_ms: float = Field(default=50.0, ge=0, le=3.6e6)
    retry_backoff_max_ms: float = Field(default=2000.0, ge=0, le=3.6e6)
    breaker_failures: int = Field(default=5, ge=1, le=100000)
    breaker_cooldown_s: Seconds = 30.0
    latency_ewma_alpha: float = Field(default=0.3, gt=0, le=1)
    run_state_file: str | None = None  # JSON file whose is_running flag is cleared when a group dies
    # client helper: a whole call (every attempt and backoff) gives up after this long; None = only max_retry bounds it
    request_deadline_s: float | None = Field(default=None, gt=0, le=86400 * 7)
    # client helper: at most one background re-probe of a group per this many seconds (degraded replicas,
    # and replicas that never answered or whose breaker is open)
    reprobe_interval_s: float = Field(default=10.0, ge=0, le=86400)
    # How long one call waits for *some* replica to start answering, across attempts, probe rounds and
    # backoffs (time spent receiving tokens from a replica does not count). A fleet restart shorter than
    # this costs latency, not an error.
    wait_for_replica_s: Seconds = 60.0
    # The latency bound (probe timeout) grows after silent probe rounds, never past this.
    latency_bound_max_s: Seconds = 60.0
    # With launch.control_port set, the client reads every host's control API this often (a background
    # thread, never on a request's path) and sends requests only to replicas the pipeline says are READY;
    # a control API that does not answer is ignored (the client's own probes decide). 0 turns this off.
    control_refresh_s: float = Field(default=1.0, ge=0, le=_HOUR_S)
    # Groups whose requests go through their SGLang Model Gateway ([[gateways]] entries of the group) instead
    # of straight to the replicas: the gateway is the group's one replica (several entries: several replicas).
    through_gateway: tuple[GroupName, ...] = ()
    # Deadlines inside one attempt (see model_server/client/deadlines.py): the first token must arrive within
    # factor x the group's smoothed time to first token, plus prompt_tokens / prefill_tokens_per_s,
    # clamped to [floor, ceiling]; the gap between two chunks within factor x the smoothed gap, clamped.
    first_token_timeout_floor_s: Seconds = 1.0
    first_token_timeout_ceiling_s: Seconds = 60.0
    first_token_timeout_factor: float = Field(default=10.0, ge=1, le=1e6)
    prefill_tokens_per_s: float = Field(default=2000.0, gt=0, le=1e9)
    stall_timeout_floor_s: Seconds = 2.0
    stall_timeout_ceiling_s: Seconds = 60.0
    stall_timeout_factor: float = Field(default=20.0, ge=1, le=1e6)
    # A stream broken after text arrived continues on another replica from the text received.
    resume_streams: bool = True
    max_resumes: int = Field(default=2, ge=0, le=1000)

    @model_validator(mode="before")
    @classmethod
    def _latency_growing_rate_sets_both(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("latency_growing_rate") is not None:
            data = dict(data)
            data.setdefault("probe_bound_growth", data["latency_growing_rate"])
            data.setdefault("degraded_latency_factor", data["latency_growing_rate"])
        return data

    @field_validator("through_gateway", mode="before")
    @classmethod
    def _one_group_alone(cls, value: Any) -> Any:
        return [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value

    @field_validator("control_refresh_s")
    @classmethod
    def _refresh_not_a_storm(cls, value: float) -> float:
        if 0 < value < MIN_SYNC_INTERVAL_S:
            raise ValueError(
                f"is {value:g}: every client would read every control API that often; set at least "
                f"{MIN_SYNC_INTERVAL_S:g} s, or 0 to stop listening"
            )
        return value

    @model_validator(mode="after")
    def _floor_below_ceiling(self) -> ClientPolicy:
        pairs = (
            ("request_timeout_floor_s", "request_timeout_ceiling_s"),
            ("first_token_timeout_floor_s", "first_token_timeout_ceiling_s"),
            ("stall_timeout_floor_s", "stall_timeout_ceiling_s"),
        )
        for low, high in pairs:
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low} ({getattr(self, low)}) is above {high} ({getattr(self, high)})")
        return self


class GpuInventoryConfig(_Strict):
    """Where GPU memory readings come from: NVML, or a simulated inventory."""

    source: Literal["nvml", "simulated"] = "nvml"
    count: int = Field(default=8, ge=0, le=_MAX_GPU_INDEX + 1)  # simulated only
    total_mib: int = Field(default=81920, gt=0, le=_MAX_MIB)  # simulated only: per GPU
    # simulated only: a JSON file {"<index>": used_mib, ...} re-read on every
    # poll, so a test or a demo can make a GPU busy and free it again
    # (a value may also be {"used_mib": N, "pids": [...]}: the processes holding it).
    state_file: str | None = Field(default=None, min_length=1)

    @field_validator("state_file")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        return value if value is None else _no_nul_char(value)


class Fleet(_Strict):
    """The whole fleet table."""

    gateways: tuple[GatewaySpec, ...] = ()  # [[gateways]]: one SGLang Model Gateway per group
    api_key_env: str | None = None  # the NAME of the variable holding the key
    launch: LaunchPolicy = LaunchPolicy()
    client: ClientPolicy = ClientPolicy()
    gpu_inventory: GpuInventoryConfig = GpuInventoryConfig()
    servers: tuple[ServerSpec, ...] = Field(min_length=1)
    _source: str = PrivateAttr(default="<memory>")  # the file it came from, for messages

    @property
    def source(self) -> str:
        return self._source

    @field_validator("api_key_env")
    @classmethod
    def _key_env_name(cls, value: str | None) -> str | None:
        return value if value is None else _env_name(value)

    @model_validator(mode="after")
    def _fleet_consistent(self) -> Fleet:
        problems: list[str] = []
        seen_names: dict[str, int] = {}
        seen_addresses: dict[str, int] = {}
        gpu_owner: dict[tuple[str, int], int] = {}
        group_kind: dict[str, tuple[ServerKind, int]] = {}
        for i, s in enumerate(self.servers):
            label = f"server '{s.name}' (servers[{i}])"
            if s.address in seen_addresses:
                j = seen_addresses[s.address]
                problems.append(
                    f"{label}: fields 'host'/'port' duplicate {s.address} of server '{self.servers[j].name}' "
                    f"(servers[{j}]): give each server its own port"
                )
            elif s.name in seen_names:
                problems.append(
                    f"{label}: field 'name' repeats the name of servers[{seen_names[s.name]}], and names must be unique"
                )
            seen_names.setdefault(s.name, i)
            seen_addresses.setdefault(s.address, i)
            for g in s.gpus:
                owner = gpu_owner.get((s.host, g))
                if owner is not None:
                    problems.append(
                        f"{label}: field 'gpus' uses GPU {g} of host {s.host}, already used by server "
                        f"'{self.servers[owner].name}' (servers[{owner}]): two servers cannot share a GPU, "
                        f"so comment one of them out"
                    )
                else:
                    gpu_owner[(s.host, g)] = i
            if s.group in group_kind and group_kind[s.group][0] != s.kind:
                kind, j = group_kind[s.group]
                problems.append(
                    f"{label}: field 'kind' is {s.kind.value} but group '{s.group}' is {kind.value} in "
                    f"servers[{j}]: a group holds one kind, so give this server another group"
                )
            group_kind.setdefault(s.group, (s.kind, i))
        server_names = {s.name for s in self.servers}
        for i, e in enumerate(self.gateways):
            if e.name in server_names:
                problems.append(
                    f"gateway '{e.name}' (gateways[{i}]): field 'name' is also the name of a server, and a client "
                    f"would take one for the other (their states, metrics and logs): give the gateway another name"
                )
        problems += self.through_gateway_problems(self.client)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def through_gateway_problems(self, policy: ClientPolicy) -> list[str]:
        """What keeps ``policy.through_gateway`` from working with this table, one sentence each."""
        out: list[str] = []
        for g in policy.through_gateway:
            entries = [e for e in self.gateways if e.group == g]
            if not self.group(g):
                out.append(
                    f"client.through_gateway names group '{g}', which the table does not have; the groups are: "
                    f"{', '.join(sorted(self.groups))}. Name one of them"
                )
            elif not entries:
                out.append(
                    f"client.through_gateway names group '{g}', which has no [[gateways]] entry to go through: add "
                    f'one (group = "{g}", port = <port>), or remove "{g}" from through_gateway'
                )
            elif len({e.api_key_env or self.api_key_env for e in entries}) > 1:
                out.append(
                    f"the [[gateways]] entries of group '{g}' name different api_key_env variables, and the client "
                    f'sends one key per group: give them the same api_key_env, or remove "{g}" from through_gateway'
                )
        return out

    # ---- queries -------------------------------------------------------------------

    def group(self, name: str | int) -> tuple[ServerSpec, ...]:
        """The servers of one group, in table order (empty if none)."""
        key = str(name)
        return tuple(s for s in self.servers if s.group == key)

    @property
    def groups(self) -> dict[str, tuple[ServerSpec, ...]]:
        out: dict[str, list[ServerSpec]] = defaultdict(list)
        for s in self.servers:
            out[s.group].append(s)
        return {g: tuple(v) for g, v in out.items()}

    def client_replicas(self, name: str | int, policy: ClientPolicy | None = None) -> tuple[ServerSpec, ...]:
        """Where a client sends a group's requests: its servers, or its gateways if ``through_gateway`` names it.

        A gateway stands in as a replica of the group's kind and model, at the address clients reach it by.
        """
        key, policy = str(name), policy or self.client
        servers = self.group(key)
        if key not in policy.through_gateway or not servers:
            return servers
        first = servers[0]
        return tuple(
            ServerSpec(
                name=e.name,
                group=key,
                kind=first.kind,
                host=e.reach_host,
                port=e.port,
                model=first.model,
                served_model_name=first.served_model_name,
            )  # fmt: skip
            for e in self.gateways
            if e.group == key
        )

    def client_api_key(self, name: str | int, policy: ClientPolicy | None = None) -> str | None:
        """The key a client sends to a group: its gateway's (``api_key_env`` of the entry) when it goes through one."""
        key, policy = str(name), policy or self.client
        env = next((e.api_key_env for e in self.gateways if e.group == key), None)
        if key not in policy.through_gateway or env is None:
            return self.api_key()  # the engines' key, which a gateway without its own also asks for
        value = os.environ.get(env, "")
        if not value:
            raise ConfigError(
                f"{self.source}: the [[gateways]] entry of group '{key}' names api_key_env {env}, which is unset or "
                f"empty, and client.through_gateway sends the group's requests through that gateway. Fix: export "
                f'{env}=<the gateway\'s key> before starting (never put the key in the file), or remove "{key}" '
                f"from through_gateway"
            )
        return value

    def server(self, name: str) -> ServerSpec:
        for s in self.servers:
            if s.name == name:
                return s
        raise ConfigError(
            f"{self.source}: no server is named '{name}'. The servers are: "
            f"{', '.join(s.name for s in self.servers)}. Use one of these names."
        )

    def api_key(self, required: bool = True) -> str | None:
        """The key from the environment variable the table names, or None if it names none.

        ``required`` makes an unset or empty variable an error: a fleet that
        launches with a key cannot be reached without it.
        """
        if not self.api_key_env:
            return None
        value = os.environ.get(self.api_key_env, "")
        if not value and required:
            raise ConfigError(
                f"{self.source}: field 'api_key_env' names the environment variable {self.api_key_env}, "
                f"which is unset or empty, and the servers of this fleet require an API key. "
                f"Fix: export {self.api_key_env}=<your key> before starting (never put the key in the file), "
                f"or remove 'api_key_env' to run without a key."
            )
        return value or None


def default_config_path() -> Path:
    """``$MODEL_SERVER_CONFIG``, else ``configs/servers.toml`` (here, else in the project)."""
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    if DEFAULT_CONFIG.exists():
        return DEFAULT_CONFIG
    return PROJECT_ROOT / DEFAULT_CONFIG


def _where(loc: tuple[Any, ...], data: dict[str, Any]) -> str:
    """Turn a pydantic error location into 'server 'x' (servers[2]), field 'port''."""
    parts = list(loc)
    if len(parts) >= 2 and parts[0] == "servers" and isinstance(parts[1], int):
        i = parts[1]
        raw = data.get("servers", [])
        name = ""
        if isinstance(raw, list) and i < len(raw) and isinstance(raw[i], dict) and isinstance(raw[i].get("name"), str):
            name = raw[i]["name"]
        label = f"server '{_short(name)[1:-1]}' (servers[{i}])" if name else f"servers[{i}]"
        rest = ".".join(str(p) for p in parts[2:])
        return f"{label}, field '{rest}'" if rest else label
    dotted = ".".join(str(p) for p in parts)
    return f"field '{dotted}'" if dotted else "the table"


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 2, 60, 60, 4, 4
MAX_PROBLEMS = 8


def _short(value: Any) -> str:
    """A bounded repr of a user's value: a 400-deep array or a 10 kB string stays one short phrase."""
    return _REPR.repr(value)


def _explain(err: ValidationError, data: dict[str, Any], source: str) -> ConfigError:
    errors = err.errors(include_url=False)
    inner = any(len(e["loc"]) > 1 and e["loc"][0] == "servers" for e in errors)
    problems = []
    for e in errors:
        loc = tuple(e["loc"])
        if inner and loc == ("servers",) and e["type"] == "too_short":
            continue  # only a consequence of a broken entry, reported on its own
        where = _where(loc, data)
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            problems.append(f"{where} is not a known key (check its spelling against configs/servers.toml)")
        elif loc == ("servers",):
            problems.append("there are no [[servers]] entries: add at least one")
        elif e["type"] == "missing":
            problems.append(f"{where} is required but missing")
        elif e["type"] == "value_error":
            problems.append(msg if not loc or msg.startswith("field '") else f"{where} {msg}")
        else:
            problems.append(f"{where}: {msg}, got {_short(e.get('input'))}")
    if len(problems) > MAX_PROBLEMS:
        problems = [*problems[:MAX_PROBLEMS], f"and {len(problems) - MAX_PROBLEMS} more problems"]
    return ConfigError(
        f"{source}: invalid fleet table: " + "; ".join(problems) + ". Fix this and run `model-server check` again."
    )


def parse_fleet(text: str, source: str = "<memory>") -> Fleet:
    """Parse and validate a fleet table given as TOML text."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: malformed TOML: {err}. Fix the syntax at that line.") from err
    except RecursionError:  # tomllib recurses once per level of nested arrays or inline tables
        raise ConfigError(
            f"{source}: malformed TOML: arrays or inline tables are nested hundreds of levels deep. A fleet table "
            f"nests at most 3 levels (mem_fraction_policy = [{{...}}]); fix the brackets."
        ) from None
    try:
        fleet = Fleet.model_validate(data)
    except ValidationError as err:
        raise _explain(err, data, source) from err
    except (RecursionError, OverflowError, TypeError, ValueError) as err:  # a validator's own limit, never a traceback
        raise ConfigError(
            f"{source}: invalid fleet table: a value could not be checked ({type(err).__name__}: {_short(str(err))}). "
            f"Look for a number or a nesting far outside what the field takes."
        ) from None
    fleet._source = source
    return fleet


def load_fleet(path: str | os.PathLike[str] | None = None) -> Fleet:
    """Read the fleet table from ``path``, else ``$MODEL_SERVER_CONFIG``, else configs/servers.toml."""
    file = Path(path) if path is not None else default_config_path()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(
            f"{file}: cannot read the fleet table ({err.strerror or err}). Give an existing file with "
            f"--config or {CONFIG_ENV}; configs/local.toml runs a simulated fleet on any machine."
        ) from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{file}: the fleet table is not UTF-8 text ({err}). Save it as UTF-8.") from err
    return parse_fleet(text, source=str(file))
