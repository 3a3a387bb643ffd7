"""GPU inventories: where the memory readings come from.

Two inventories behind one protocol: :class:`NvmlInventory` reads NVML
(``nvidia-ml-py``, imported only when used) and :class:`SimulatedInventory`
serves the simulated fleet and the tests, optionally from a JSON file that is
re-read on every poll so a GPU can be made busy and free again from outside.
The decisions on the readings (is a GPU group free, which
``--mem-fraction-static``) are pure, in :mod:`model_server.launcher.gpu_memory`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from model_server.config import GpuInventoryConfig
from model_server.errors import LaunchError
from model_server.launcher.gpu_memory import GpuProcess, GpuReading

__all__ = ["GpuInventory", "NvmlInventory", "SimulatedInventory", "gpu_processes", "make_inventory"]

_MIB = 1024 * 1024


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
        _check_indices(
            indices, self.count, "the simulated inventory", "Use indices 0-{last} or raise gpu_inventory.count"
        )
        return [GpuReading(i, min(used.get(i, 0), self.total_mib), self.total_mib) for i in indices]


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
                f'NVIDIA driver and the nvidia-ml-py package for engine = "sglang". On a machine without '
                f"GPUs run the simulated fleet instead: --config configs/local.toml "
                f'(engine = "sim", gpu_inventory.source = "simulated").'
            ) from err
        self._nvml = pynvml

    def read(self, indices: Sequence[int]) -> list[GpuReading]:
        _check_indices(indices, self._count, "NVML on this host", "Fix the server's 'gpus' (as nvidia-smi shows them)")
        out = []
        for i in indices:
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
                    out[(i, int(p.pid))] = GpuProcess(
                        i, int(p.pid), int(used) // _MIB if isinstance(used, int) else None
                    )
        return list(out.values())


def make_inventory(config: GpuInventoryConfig) -> GpuInventory:
    """The inventory the fleet table declares (NVML errors are LaunchError, see NvmlInventory)."""
    if config.source == "simulated":
        return SimulatedInventory.from_config(config)
    return NvmlInventory()


def _check_indices(indices: Sequence[int], count: int, source: str, fix: str) -> None:
    """LaunchError naming the first GPU index that ``source`` (which has ``count`` GPUs) does not have."""
    for i in indices:
        if not 0 <= i < count:
            raise LaunchError(f"GPU {i} does not exist: {source} reports {count} GPUs. {fix.format(last=count - 1)}.")
