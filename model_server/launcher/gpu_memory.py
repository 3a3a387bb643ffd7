"""GPU memory readings and the pure decisions made on them: is a GPU free, which ``--mem-fraction-static``.

No I/O: the inventories that take the readings (NVML, simulated) live in
:mod:`model_server.launcher.gpu`. The supervisor's GPU wait
(:mod:`model_server.launcher.steps`) and ``--dry-run`` both decide with
:func:`decide_gpus`, so a dry run prints the fraction a real run would choose.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from model_server.config import LaunchPolicy, MemFractionRule
from model_server.errors import LaunchError

__all__ = [
    "GpuDecision",
    "GpuProcess",
    "GpuReading",
    "busy_gpus",
    "choose_mem_fraction",
    "decide_gpus",
    "describe_busy",
    "is_free",
    "lowest_free_ratio",
]


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


def describe_busy(busy: Sequence[GpuReading], holders: Sequence[tuple[GpuProcess, str]] = ()) -> str:
    """'GPU 1: 30000 of 81920 MiB used (pid 12 holds 29000 MiB of GPU 1: python ...)', naming at most 3 holders a GPU.

    ``holders`` pairs each process NVML lists with a description of it (its
    command line), where the inventory can tell.
    """
    parts = []
    for r in busy:
        mine = [(h, what) for h, what in holders if h.index == r.index]
        who = "; ".join(f"{h.describe()}: {what}" for h, what in mine[:3])
        parts.append(r.describe() + (f" ({who})" if who else ""))
    return "; ".join(parts)


@dataclass(frozen=True)
class GpuDecision:
    """After a GPU reading: start with ``mem_fraction``; or wait (``busy`` says on what); or ``refusal``: FAILED."""

    mem_fraction: float | None = None
    busy: str = ""
    refusal: str = ""


def decide_gpus(
    policy: LaunchPolicy,
    server: str,
    readings: Sequence[GpuReading],
    holders: Sequence[tuple[GpuProcess, str]] = (),
    waited_s: float = 0.0,
) -> GpuDecision:
    """Free GPUs: the ``--mem-fraction-static`` to start with (or the refusal when memory is short).

    Busy GPUs: wait, unless the server has waited ``gpu_wait_timeout_s``
    already. The supervisor and ``--dry-run`` both ask this.
    """
    busy = busy_gpus(readings, policy.gpu_free_threshold_mib)
    if not busy:
        try:
            return GpuDecision(mem_fraction=choose_mem_fraction(policy.mem_fraction_policy, readings, server))
        except LaunchError as err:
            return GpuDecision(refusal=str(err))
    what = describe_busy(busy, holders)
    timeout = policy.gpu_wait_timeout_s
    if timeout is not None and waited_s >= timeout:
        return GpuDecision(
            busy=what,
            refusal=(
                f"server '{server}': its GPUs stayed busy for {waited_s:.0f} s ({what}; a GPU is free below "
                f"{policy.gpu_free_threshold_mib} MiB used) and launch.gpu_wait_timeout_s is {timeout:g}. "
                f"Free the GPUs or raise the timeout"
            ),
        )
    return GpuDecision(busy=what)
