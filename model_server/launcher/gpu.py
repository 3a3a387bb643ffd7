"""GPU memory readings and the decisions made on them.

Two inventories behind one protocol: :class:`NvmlInventory` reads NVML
(``nvidia-ml-py``, imported only when used) and :class:`SimulatedInventory`
serves the simulated fleet and the tests, optionally from a JSON file that is
re-read on every poll so a GPU can be made busy and free again from outside.
The decisions (is a GPU group free, which ``--mem-fraction-static``) are pure
functions of the readings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol, Sequence

from model_server.config import GpuInventoryConfig, MemFractionRule
from model_server.errors import LaunchError

__all__ = [
    "GpuInventory",
    "GpuProcess",
    "GpuReading",
    "NvmlInventory",
    "SimulatedInventory",
    "busy_gpus",
    "choose_mem_fraction",
    "gpu_processes",
    "is_free",
    "lowest_free_ratio",
    "make_inventory",
]

_MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuReading:
    """Memory of one GPU, in MiB, at one moment."""

    index: int
    used_mib: int
    total_mib: int

    @property
    def free_mib(self) -> int:
        return max(0, self.total_mib - self.used_mib)

    @property
    def free_ratio(self) -> float:
        return self.free_mib / self.total_mib if self.total_mib > 0 else 0.0

    def describe(self) -> str:
        return f"GPU {self.index}: {self.used_mib} of {self.total_mib} MiB used"


@dataclass(frozen=True)
class GpuProcess:
    """A process holding memory on a GPU, as NVML lists it (``used_mib`` None when NVML does not say)."""

    index: int
    pid: int
    used_mib: int | None = None

    def describe(self) -> str:
        amount = f"{self.used_mib} MiB" if self.used_mib is not None else "memory"
        return f"pid {self.pid} holds {amount} of GPU {self.index}"


class GpuInventory(Protocol):
    """Anything that reports the memory of GPUs by their nvidia-smi index."""

    def read(self, indices: Sequence[int]) -> list[GpuReading]:
        """One reading per index, in the given order; LaunchError for an unknown index."""
        ...


def gpu_processes(inventory: object, indices: Sequence[int]) -> list[GpuProcess]:
    """The processes holding memory on ``indices``, where the inventory can tell (else empty, never an error).

    NVML's pids are the host's: inside a container they may name no process here.
    """
    lister = getattr(inventory, "processes", None)
    if lister is None:
        return []
    try:
        return list(lister(indices))
    except Exception:  # noqa: BLE001 - a report, best effort: NVML may not support it on this driver
        return []


# ---- pure decisions ----------------------------------------------------------------


def is_free(reading: GpuReading, threshold_mib: int) -> bool:
    """The original's rule: a GPU is free when its used memory is below the threshold."""
    return reading.used_mib < threshold_mib


def busy_gpus(readings: Iterable[GpuReading], threshold_mib: int) -> list[GpuReading]:
    """The readings of the GPUs that are not free (empty: the group may start)."""
    return [r for r in readings if not is_free(r, threshold_mib)]


def lowest_free_ratio(readings: Iterable[GpuReading]) -> float:
    """The free ratio of the fullest GPU (1.0 for no GPUs)."""
    return min((r.free_ratio for r in readings), default=1.0)


def choose_mem_fraction(rules: Sequence[MemFractionRule], readings: Sequence[GpuReading], server: str = "") -> float:
    """``--mem-fraction-static``: the first rule whose min_free_ratio <= the lowest free ratio wins.

    Rules are tried in the order given (the config sorts them, highest ratio
    first). No rule matching means the GPUs hold too much already: LaunchError.
    """
    ratio = lowest_free_ratio(readings)
    for rule in rules:
        if rule.min_free_ratio <= ratio:
            return rule.mem_fraction_static
    fullest = min(readings, key=lambda r: r.free_ratio)
    need = max(rule.min_free_ratio for rule in rules)
    least = min(rule.min_free_ratio for rule in rules)
    label = f"server '{server}': " if server else ""
    raise LaunchError(
        f"{label}GPU memory is not enough: {fullest.describe()} ({ratio:.1%} free), and the "
        f"launch.mem_fraction_policy needs at least {least:.0%} free (best rule: {need:.0%}). "
        f"Free that GPU (see nvidia-smi), or add a lower rule to mem_fraction_policy."
    )


# ---- inventories -------------------------------------------------------------------


class SimulatedInventory:
    """``count`` GPUs of ``total_mib`` each; used memory 0, or as a JSON state file says.

    The state file maps an index (as text) to used MiB, e.g. ``{"1": 30000}``;
    a missing file or index means idle. It is re-read on every :meth:`read`.
    """

    def __init__(self, count: int, total_mib: int, state_file: str | Path | None = None) -> None:
        self.count = count
        self.total_mib = total_mib
        self.state_file = Path(state_file) if state_file else None

    @classmethod
    def from_config(cls, config: GpuInventoryConfig) -> SimulatedInventory:
        return cls(config.count, config.total_mib, config.state_file)

    def _state(self) -> dict[int, tuple[int, tuple[int, ...]]]:
        """index -> (used MiB, pids holding it), from the state file."""
        if self.state_file is None or not self.state_file.exists():
            return {}
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8") or "{}")
            out = {}
            for k, v in data.items():
                if isinstance(v, dict):
                    out[int(k)] = (int(v.get("used_mib", 0)), tuple(int(p) for p in v.get("pids", ())))
                else:
                    out[int(k)] = (int(v), ())
            return out
        except (OSError, ValueError, TypeError, AttributeError, OverflowError) as err:
            raise LaunchError(
                f"{self.state_file}: the simulated GPU state file is not a JSON object of "
                f'{{"<index>": used_mib}} or {{"<index>": {{"used_mib": N, "pids": [...]}}}} ({err}). Fix or remove it.'
            ) from err

    def _used(self) -> dict[int, int]:
        return {i: used for i, (used, _) in self._state().items()}

    def processes(self, indices: Sequence[int]) -> list[GpuProcess]:
        state = self._state()
        return [GpuProcess(i, pid) for i in indices for pid in state.get(i, (0, ()))[1]]

    def read(self, indices: Sequence[int]) -> list[GpuReading]:
        used = self._used()
        out = []
        for i in indices:
            if not 0 <= i < self.count:
                raise LaunchError(
                    f"GPU {i} does not exist: the simulated inventory has {self.count} GPUs "
                    f"(gpu_inventory.count). Use indices 0-{self.count - 1} or raise the count."
                )
            out.append(GpuReading(i, min(used.get(i, 0), self.total_mib), self.total_mib))
        return out


class NvmlInventory:
    """Real GPUs through NVML; nvidia-ml-py is imported here, never at package import."""

    def __init__(self) -> None:
        try:
            import pynvml  # noqa: PLC0415 - lazy on purpose: no GPU stack at import time

            pynvml.nvmlInit()
            self._count = int(pynvml.nvmlDeviceGetCount())
        except Exception as err:  # ImportError, NVMLError (no driver, no library)
            raise LaunchError(
                f"cannot read GPU memory through NVML ({type(err).__name__}: {err}). This host needs an "
                f"NVIDIA driver and the nvidia-ml-py package for engine = \"sglang\". On a machine without "
                f"GPUs run the simulated fleet instead: --config configs/local.toml "
                f'(engine = "sim", gpu_inventory.source = "simulated").'
            ) from err
        self._nvml = pynvml

    def read(self, indices: Sequence[int]) -> list[GpuReading]:
        out = []
        for i in indices:
            if not 0 <= i < self._count:
                raise LaunchError(
                    f"GPU {i} does not exist: NVML reports {self._count} GPUs on this host. "
                    f"Fix the server's 'gpus' (indices as nvidia-smi shows them)."
                )
            try:
                handle = self._nvml.nvmlDeviceGetHandleByIndex(i)
                info = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception as err:
                raise LaunchError(f"NVML could not read the memory of GPU {i}: {err}. Check nvidia-smi.") from err
            out.append(GpuReading(i, int(info.used) // _MIB, int(info.total) // _MIB))
        return out

    def processes(self, indices: Sequence[int]) -> list[GpuProcess]:
        """NVML's compute and graphics processes of each GPU (best effort: errors give no entry)."""
        out: dict[tuple[int, int], GpuProcess] = {}
        for i in indices:
            try:
                handle = self._nvml.nvmlDeviceGetHandleByIndex(i)
            except Exception:  # noqa: BLE001
                continue
            for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
                try:
                    found = getattr(self._nvml, getter)(handle)
                except Exception:  # noqa: BLE001 - not supported on this driver
                    continue
                for p in found:
                    used = getattr(p, "usedGpuMemory", None)
                    out[(i, int(p.pid))] = GpuProcess(i, int(p.pid), int(used) // _MIB if isinstance(used, int) else None)
        return list(out.values())


def make_inventory(config: GpuInventoryConfig) -> GpuInventory:
    """The inventory the fleet table declares (NVML errors are LaunchError, see NvmlInventory)."""
    if config.source == "simulated":
        return SimulatedInventory.from_config(config)
    return NvmlInventory()
