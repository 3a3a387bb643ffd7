"""A seeded random fault schedule for chaos runs, with at least one replica always healthy.

Pure: ``chaos_schedule(seed, replicas, ...)`` returns the faults, each with its
start and the time it is healed (a killed replica is started again then; a
hang is lifted; a rate or slow factor is reset). A new fault starts only on a
replica that is healthy at that moment and only while fewer than
``replicas - 1`` replicas are faulted, so one is always healthy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["CHAOS_KINDS", "ChaosFault", "chaos_schedule", "healthy_at"]

CHAOS_KINDS = ("kill", "hang", "errors", "slow", "malformed", "drop")


@dataclass(frozen=True)
class ChaosFault:
    at_s: float
    heal_s: float
    kind: str  # one of CHAOS_KINDS
    replica: int  # index into the replica list

    def sim_faults(self) -> dict | None:
        """The simulator control body that starts it (None: kill, done with a signal)."""
        return {
            "hang": {"hang": True},
            "errors": {"error_rate": 1.0, "error_status": 500},
            "slow": {"slow_factor": 20.0},
            "malformed": {"malformed_rate": 1.0},
            "drop": {"drop_stream_rate": 1.0},
        }.get(self.kind)


def chaos_schedule(
    seed: int,
    replicas: int,
    *,
    duration_s: float,
    start_s: float = 1.0,
    gap_s: tuple[float, float] = (0.6, 1.6),
    lasting_s: tuple[float, float] = (1.5, 4.0),
    kinds: tuple[str, ...] = CHAOS_KINDS,
    recovery_s: float = 4.0,
) -> list[ChaosFault]:
    """Faults in [start_s, duration_s), every kind at least once when there is room, never all replicas at once."""
    if replicas < 2:
        raise ValueError("chaos needs at least two replicas: one must always stay healthy")
    rng = random.Random(seed)
    faults: list[ChaosFault] = []
    busy_until = [0.0] * replicas
    order = list(kinds)
    rng.shuffle(order)  # each kind once first (in a random order), then random kinds
    t = start_s
    while True:
        t = round(t + rng.uniform(*gap_s), 3)  # rounded before any comparison, so the gaps hold as stored
        if t >= duration_s:
            return faults
        free = [i for i in range(replicas) if busy_until[i] <= t]
        faulted = replicas - len(free)
        if not free or faulted >= replicas - 1:
            continue
        kind = order.pop(0) if order else rng.choice(kinds)
        replica = rng.choice(free)
        heal = round(min(t + rng.uniform(*lasting_s), duration_s), 3)
        # room to come back before the next fault on it: a killed replica restarts (a new process)
        busy_until[replica] = heal + (recovery_s if kind == "kill" else 0.5)
        faults.append(ChaosFault(t, heal, kind, replica))


def healthy_at(faults: list[ChaosFault], replicas: int, t: float, recovery_s: float = 0.0) -> set[int]:
    """The replicas no fault touches at time t (a killed one counts as down for ``recovery_s`` after its heal)."""
    down = {f.replica for f in faults if f.at_s <= t < f.heal_s + (recovery_s if f.kind == "kill" else 0.0)}
    return set(range(replicas)) - down
