"""The ``[[gateways]]`` section of the fleet table: one SGLang Model Gateway per group.

Pure pydantic, no I/O, and no import of :mod:`model_server.config` (which
imports this module for its ``gateways`` field). What needs the rest of the
table (the group exists, ports do not collide, defaults taken from
``[client]`` and ``[launch]``) is in :mod:`model_server.gateway.settings`.

One gateway serves one group. The gateway's regular HTTP router ignores the
``model`` of a request (it picks among *all* its workers), and its
multi-model mode (``enable_igw``) drops ``--worker-urls`` and, in
sglang-router 0.3.2, panics at start without network access (it downloads a
tokenizer vocabulary), so a gateway per group is the one setup that routes a
chat request to a chat replica and an embedding to an embedding replica.

Knob names are the gateway's own (``retry_max_retries``,
``cb_timeout_duration_secs``, ...), so its documentation applies as is; a
knob left out takes a default derived from the table (see settings.py), else
the gateway's own default. The knobs that end in ``_s`` are model-server's:
how the gateway process is supervised, and ``sync_interval_s``, how often its
worker list follows the pipelines' control APIs (gateway/sync.py).
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from model_server.common.urls import reachable_host, server_url

__all__ = ["MIN_SYNC_INTERVAL_S", "GatewayPolicy", "GatewaySpec", "GroupName"]

_HOUR_S = 3600.0
_DAY_S = 86400.0
_MONTH_S = 30 * 86400.0
_U32 = (1 << 32) - 1
MIN_SYNC_INTERVAL_S = 0.1
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _stripped(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


def _group_as_text(value: Any) -> Any:
    # The original keyed groups by model size: group = 8 means "8" (as in [[servers]]).
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _stripped(value)


def _no_nul(value: str) -> str:
    if "\0" in value:
        raise ValueError("contains a NUL character, which no name, host or path can hold: remove it")
    return value


def _a_file_name(value: str) -> str:
    if value and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@:-]*", value):
        raise ValueError(
            f"is {value!r}: a gateway's name also names its log file, so use letters, digits and . _ @ : - "
            f"(starting with a letter or digit)"
        )
    return value


def _a_worker_path(value: str) -> str:
    if not value.startswith("/") or any(c.isspace() for c in value):
        raise ValueError(f"is {value!r}: give a path on the workers, such as /health")
    return value


def _an_env_name(value: str) -> str:
    if not _ENV_NAME.match(value):
        raise ValueError(
            f"holds {value!r}, which is not an environment variable name (letters, digits and _, not starting "
            f"with a digit). Give the NAME of the variable that holds the key, never the key"
        )
    return value


# The entry's kinds of text, each checked where it is declared. None holds a NUL character; names and hosts lose
# surrounding spaces; a host (like a group) is never empty. (A Field constraint put before the validators applies
# to the stripped text.)
_NO_NUL = AfterValidator(_no_nul)
_Name = Annotated[str, BeforeValidator(_stripped), _NO_NUL, AfterValidator(_a_file_name)]
GroupName = Annotated[str, Field(min_length=1), BeforeValidator(_group_as_text), _NO_NUL]
_Host = Annotated[str, Field(min_length=1), BeforeValidator(_stripped), _NO_NUL]
_WorkerPath = Annotated[str, _NO_NUL, AfterValidator(_a_worker_path)]
_EnvName = Annotated[str, AfterValidator(_an_env_name)]


class GatewayPolicy(str, Enum):
    """The gateway's load-balancing policies for regular (not prefill/decode) workers."""

    cache_aware = "cache_aware"  # the gateway's default: prefix affinity, load balance past the thresholds
    power_of_two = "power_of_two"  # the less loaded of two random workers; needs >= 2 workers at start
    round_robin = "round_robin"
    random = "random"


class GatewaySpec(BaseModel):
    """One gateway: where it listens, which group it fronts, how it routes, retries and checks health."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: _Name = ""  # defaults to "gateway-<group>"
    group: GroupName
    host: _Host = "127.0.0.1"  # bind address; 0.0.0.0 to serve other hosts
    # Where clients reach it ([client] through_gateway): default `host`, loopback for a wildcard. Set it to this
    # machine's name when the gateway binds 0.0.0.0 and ModelServer runs on other machines.
    client_host: _Host | None = None
    port: int = Field(ge=1, le=65535)
    policy: GatewayPolicy = GatewayPolicy.cache_aware
    # The NAME of the variable holding the gateway's own key (what its clients send). Unset: the fleet's
    # api_key_env, so the gateway asks its clients for the key the engines ask it for.
    api_key_env: _EnvName | None = None
    # Prometheus endpoint; host defaults to `host`, port to port + 1.
    prometheus_host: _Host | None = None
    prometheus_port: int | None = Field(default=None, ge=1, le=65535)
    log_level: Literal["debug", "info", "warn", "error"] = "info"

    # ---- routing (cache_aware) -------------------------------------------------------------------------
    cache_threshold: float | None = Field(default=None, ge=0, le=1)
    balance_abs_threshold: int | None = Field(default=None, ge=0, le=_U32)
    balance_rel_threshold: float | None = Field(default=None, ge=1, le=1e6)
    eviction_interval_secs: int | None = Field(default=None, ge=1, le=int(_DAY_S))
    max_tree_size: int | None = Field(default=None, ge=1, le=1 << 40)

    # ---- retries: default from [client] max_retry and retry_backoff_*_ms ----------------------------------
    retry_max_retries: int | None = Field(default=None, ge=1, le=1000)  # attempts, the first included
    retry_initial_backoff_ms: int | None = Field(default=None, ge=1, le=3_600_000)
    retry_max_backoff_ms: int | None = Field(default=None, ge=1, le=3_600_000)
    retry_backoff_multiplier: float | None = Field(default=None, ge=1, le=100)
    retry_jitter_factor: float | None = Field(default=None, ge=0, le=1)
    disable_retries: bool = False

    # ---- circuit breaker per worker: default from [client] breaker_failures and breaker_cooldown_s -----------
    cb_failure_threshold: int | None = Field(default=None, ge=1, le=100_000)
    cb_success_threshold: int | None = Field(default=None, ge=1, le=100_000)
    cb_timeout_duration_secs: int | None = Field(default=None, ge=1, le=int(_DAY_S))
    cb_window_duration_secs: int | None = Field(default=None, ge=1, le=int(_DAY_S))
    disable_circuit_breaker: bool = False

    # ---- the gateway's health checks of its workers: default from [launch] health_interval_s and
    # health_failures_to_restart (SGLang's cheap /health, not /health_generate) ----------------------------------
    health_check_endpoint: _WorkerPath = "/health"
    health_check_interval_secs: int | None = Field(default=None, ge=1, le=int(_HOUR_S))
    health_check_timeout_secs: int | None = Field(default=None, ge=1, le=int(_HOUR_S))
    health_failure_threshold: int | None = Field(default=None, ge=1, le=1000)
    health_success_threshold: int | None = Field(default=None, ge=1, le=1000)

    # ---- requests: request_timeout_secs defaults to [client] request_timeout_ceiling_s ------------------------
    request_timeout_secs: int | None = Field(default=None, ge=1, le=int(_DAY_S))
    max_concurrent_requests: int = Field(default=-1, ge=-1, le=1_000_000)  # -1: no limit
    queue_size: int | None = Field(default=None, ge=0, le=1_000_000)
    queue_timeout_secs: int | None = Field(default=None, ge=1, le=int(_DAY_S))
    worker_startup_timeout_secs: int | None = Field(
        default=None, ge=1, le=int(_DAY_S)
    )  # default [launch] startup_timeout_s

    # ---- supervision of the gateway process: defaults from [launch] ---------------------------------------
    startup_timeout_s: float = Field(default=60.0, gt=0, le=_HOUR_S)  # until /liveness answers 200
    liveness_interval_s: float | None = Field(default=None, gt=0, le=_HOUR_S)
    liveness_timeout_s: float = Field(default=5.0, gt=0, le=_HOUR_S)
    liveness_failures_to_restart: int | None = Field(default=None, ge=1, le=1000)
    restart_backoff_initial_s: float | None = Field(default=None, ge=0, le=_HOUR_S)
    restart_backoff_max_s: float | None = Field(default=None, ge=0, le=_DAY_S)
    max_restarts: int | None = Field(default=None, ge=0, le=100_000)  # in restart_window_s; more ends it FAILED
    restart_window_s: float | None = Field(default=None, gt=0, le=_MONTH_S)
    stop_grace_s: float | None = Field(default=None, ge=0, le=_HOUR_S)  # also the gateway's own shutdown grace

    # ---- the worker list follows the control plane (with [launch] control_port) -----------------------------
    # Read every host's GET /status this often and keep exactly the READY replicas as workers (a DRAINING one
    # leaves before it stops, so below [launch] drain_notice_s). 0: the static list of the table, as without
    # a control API.
    sync_interval_s: float = Field(default=1.0, ge=0, le=_HOUR_S)

    @property
    def reach_host(self) -> str:
        """Where clients reach it: ``client_host``, else its bind address (a wildcard meaning loopback)."""
        return reachable_host(self.client_host or self.host)

    @property
    def client_url(self) -> str:
        """``http://host:port`` as clients reach it (IPv6 in brackets)."""
        return server_url(self.reach_host, self.port)

    @model_validator(mode="after")
    def _consistent(self) -> GatewaySpec:
        if not self.name:
            object.__setattr__(self, "name", f"gateway-{self.group}")
        low, high = self.retry_initial_backoff_ms, self.retry_max_backoff_ms
        if low is not None and high is not None and low > high:
            raise ValueError(
                f"gateway '{self.name}': retry_initial_backoff_ms ({low}) is above retry_max_backoff_ms ({high}): "
                f"lower the first or raise the second"
            )
        if 0 < self.sync_interval_s < MIN_SYNC_INTERVAL_S:
            raise ValueError(
                f"gateway '{self.name}': sync_interval_s is {self.sync_interval_s:g}, and the control APIs are read "
                f"at most every {MIN_SYNC_INTERVAL_S:g} s: set at least {MIN_SYNC_INTERVAL_S:g}, or 0 for a static "
                f"worker list"
            )
        low_s, high_s = self.restart_backoff_initial_s, self.restart_backoff_max_s
        if low_s is not None and high_s is not None and low_s > high_s:
            raise ValueError(
                f"gateway '{self.name}': restart_backoff_initial_s ({low_s:g}) is above restart_backoff_max_s "
                f"({high_s:g}): lower the first or raise the second"
            )
        return self
