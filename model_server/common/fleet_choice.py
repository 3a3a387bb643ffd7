"""Which fleet table to use when none is named: the embedded default.

The rule, the same for ``model-server serve`` / ``python serve_llm_pipeline.py``
and for ``ModelServer()``::

    --config FILE (or ModelServer(path))             -> that file
    $MODEL_SERVER_CONFIG                             -> that file
    this machine is a host of configs/servers.toml   -> configs/servers.toml
    no NVIDIA GPU here (NVML absent or fails)        -> configs/local.toml, the simulated fleet
    a GPU here, but not a host of the table          -> serve: refused (exit 2), naming both fixes
                                                        client: configs/servers.toml (its servers
                                                        are elsewhere; a client needs no GPU)

:func:`choose_fleet` is the decision, a pure function of :class:`FleetFacts`;
:func:`gather_facts` reads the machine (interface addresses through
:mod:`model_server.common.hosts`, NVML through :mod:`model_server.launcher.gpu`) and
:func:`resolve_fleet` / :func:`default_fleet_path` put the two together.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from model_server.config import CONFIG_ENV, DEFAULT_CONFIG, PROJECT_ROOT, load_fleet

__all__ = [
    "FleetChoice",
    "FleetFacts",
    "Source",
    "choose_fleet",
    "default_fleet_path",
    "gather_facts",
    "nvml_sees_gpu",
    "resolve_fleet",
]

log = logging.getLogger(__name__)

SIMULATED_NAME = "local.toml"  # next to configs/servers.toml, wherever that was found


class Source(str, Enum):
    """Where the chosen table came from."""

    GIVEN = "given"  # --config, or a path passed to ModelServer
    ENV = "env"  # $MODEL_SERVER_CONFIG
    TABLE = "table"  # configs/servers.toml
    SIMULATED = "simulated"  # configs/local.toml
    REFUSED = "refused"  # a GPU machine the table does not name (serve only)


@dataclass(frozen=True)
class FleetFacts:
    """Everything the choice depends on. ``host_in_table`` and ``gpu_present`` matter only
    when neither ``config`` nor ``env_config`` is set (and need not be gathered then)."""

    config: Path | None = None  # --config, as given
    env_config: str | None = None  # the value of $MODEL_SERVER_CONFIG ("" counts as unset)
    table: Path = Path("configs") / "servers.toml"
    simulated: Path = Path("configs") / SIMULATED_NAME
    host_in_table: bool = False
    gpu_present: bool = False
    table_hosts: tuple[str, ...] = ()  # for the refusal: the hosts the table names
    this_machine: tuple[str, ...] = ()  # for the refusal: this machine's addresses and names


@dataclass(frozen=True)
class FleetChoice:
    """The table to use (None when refused) and one line that says why."""

    path: Path | None
    source: Source
    message: str

    @property
    def refused(self) -> bool:
        return self.path is None


def _refusal(f: FleetFacts) -> str:
    hosts = ", ".join(f.table_hosts) or "(none)"
    here = ", ".join(f.this_machine) or "(no addresses found)"
    return (
        f"{f.table}: this machine has an NVIDIA GPU but is not a host of this table, and no table was named "
        f"(--config or ${CONFIG_ENV}). The table's hosts are {hosts}; this machine is {here}. Fix one of: "
        f"(1) put this machine's address in the 'host' of its servers in {f.table} (or pass --host-ip with the "
        f"address the table uses for it); (2) name the table to run with --config FILE or ${CONFIG_ENV}, e.g. "
        f"--config {f.simulated} for the simulated fleet."
    )


def choose_fleet(facts: FleetFacts, *, for_client: bool = False) -> FleetChoice:
    """Pure: the rule in the module docstring."""
    if facts.config is not None:
        return FleetChoice(facts.config, Source.GIVEN, f"using the fleet table {facts.config} (--config)")
    if facts.env_config:
        return FleetChoice(
            Path(facts.env_config), Source.ENV, f"using the fleet table {facts.env_config} (${CONFIG_ENV})"
        )
    if facts.host_in_table:
        return FleetChoice(facts.table, Source.TABLE, f"this machine is a host of {facts.table}: using it")
    if not facts.gpu_present:
        return FleetChoice(
            facts.simulated,
            Source.SIMULATED,
            f"no GPU here and this host is not in {facts.table}: running the simulated fleet {facts.simulated}; "
            f"pass --config to choose",
        )
    if for_client:
        return FleetChoice(
            facts.table, Source.TABLE,
            f"this machine is not a host of {facts.table} but has a GPU: the client uses that table "
            f"(its servers run elsewhere); set ${CONFIG_ENV} to choose",
        )  # fmt: skip
    return FleetChoice(None, Source.REFUSED, _refusal(facts))


# ---- the facts of this machine ------------------------------------------------------


@functools.lru_cache(maxsize=1)
def nvml_sees_gpu() -> bool:
    """True if NVML initialises and reports a GPU (no driver, no library or no GPU: False). Asked once."""
    try:
        import pynvml  # lazy on purpose: no GPU stack at import time

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount()) > 0
        finally:
            pynvml.nvmlShutdown()
    except Exception as err:  # ImportError, NVMLError of every kind: no usable GPU here
        log.debug("no usable NVIDIA GPU: %s", err)
        return False


def _table_facts(table: Path, host_ip: Iterable[str]) -> tuple[bool, tuple[str, ...], tuple[str, ...]]:
    """(is this machine a host of ``table``, the table's hosts, this machine's names)."""
    from model_server.common.hosts import ALWAYS_LOCAL, local_identities, match_servers

    identities = local_identities(tuple(host_ip))
    shown = tuple(sorted(i for i in identities if i not in ALWAYS_LOCAL))
    if not table.exists():
        return False, (), shown
    fleet = load_fleet(table)  # a broken default table is an error, not a reason to run something else
    hosts = tuple(sorted({s.host for s in fleet.servers}))
    return bool(match_servers(fleet.servers, identities)), hosts, shown


def gather_facts(
    config: str | os.PathLike[str] | None = None,
    host_ip: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> FleetFacts:
    """Read this machine, as far as the choice needs it (nothing when a table is named)."""
    env = (os.environ if environ is None else environ).get(CONFIG_ENV) or None
    if config is not None or env:
        return FleetFacts(config=Path(config) if config is not None else None, env_config=env)
    table = _default_table()
    in_table, hosts, here = _table_facts(table, host_ip)
    return FleetFacts(
        table=table,
        simulated=table.with_name(SIMULATED_NAME),
        host_in_table=in_table,
        gpu_present=False if in_table else nvml_sees_gpu(),  # a host of the table needs no second look
        table_hosts=hosts,
        this_machine=here,
    )


def _default_table() -> Path:
    """configs/servers.toml in the current directory, else in the project (as config.default_config_path)."""
    return DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else PROJECT_ROOT / DEFAULT_CONFIG


def resolve_fleet(config: str | os.PathLike[str] | None = None, host_ip: Iterable[str] = ()) -> FleetChoice:
    """The launch pipeline's choice for this machine (``--config``, ``--host-ip`` as given)."""
    return choose_fleet(gather_facts(config, host_ip))


_logged: set[tuple[str, str]] = set()
_logged_lock = threading.Lock()


def default_fleet_path() -> Path:
    """The table ``ModelServer()`` reads when given none: the same rule as ``serve``, except that a
    GPU machine the table does not name still reads ``configs/servers.toml``. Logged once (debug)."""
    choice = choose_fleet(gather_facts(), for_client=True)
    assert choice.path is not None  # the client's rule never refuses
    key = (str(choice.path), choice.source.value)
    with _logged_lock:
        first = key not in _logged
        _logged.add(key)
    if first:
        log.debug("ModelServer(): %s", choice.message)
    return choice.path
