"""Routing policies: which replica of a group gets the next request (pure).

- ``fastest`` (the original's): the lowest smoothed latency; ties go to the one
  with fewer requests in flight, then to table order. It keeps a warm replica
  busy and leaves the rest as spares.
- ``p2c`` (power of two choices): pick two distinct replicas at random and send
  to the one with the lower ``latency x (1 + in_flight)``. It spreads load over
  every healthy replica while still avoiding slow ones.

Candidates are tiered before a policy applies: replicas whose breaker lets a
request through and that this request has not tried yet come first, non-degraded
ones before degraded ones; replicas already tried come only when nothing else
is left. A *stuck* replica (a request sent there waits for its first token far
longer than the group's usual time) is no fresh choice: it comes after every
replica that is not stuck, tried or not. An open breaker is never a candidate.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from model_server.config import RoutingPolicy

__all__ = ["Candidate", "choose", "fastest", "p2c", "p2c_score"]


@dataclass(frozen=True)
class Candidate:
    name: str
    latency_s: float  # math.inf when unknown
    in_flight: int
    available: bool = True  # the breaker lets a request through
    degraded: bool = False
    stuck: bool = False  # a request sent there waits for its first token far too long


def fastest(candidates: Sequence[Candidate]) -> int:
    """Index of the lowest latency (then fewest in flight, then first)."""
    return min(range(len(candidates)), key=lambda i: (candidates[i].latency_s, candidates[i].in_flight, i))


def p2c_score(c: Candidate) -> float:
    return c.latency_s * (1 + c.in_flight)


def p2c(candidates: Sequence[Candidate], rng: random.Random) -> int:
    """Power of two choices: the better of two distinct random candidates."""
    if len(candidates) == 1:
        return 0
    a, b = rng.sample(range(len(candidates)), 2)
    ka = (p2c_score(candidates[a]), candidates[a].in_flight)
    kb = (p2c_score(candidates[b]), candidates[b].in_flight)
    return a if ka <= kb else b  # a tie goes to the first draw: random, so no replica is favoured


def choose(
    candidates: Sequence[Candidate],
    policy: RoutingPolicy,
    rng: random.Random,
    tried: Collection[str] = (),
) -> int | None:
    """Index (into ``candidates``) of the replica to use, or None if no breaker lets one through."""
    usable = [i for i, c in enumerate(candidates) if c.available]
    moving = [i for i in usable if not candidates[i].stuck]
    tiers = (
        [i for i in moving if candidates[i].name not in tried and not candidates[i].degraded],
        [i for i in moving if candidates[i].name not in tried],
        [i for i in moving if not candidates[i].degraded],
        moving,
        usable,
    )
    for tier in tiers:
        if tier:
            subset = [candidates[i] for i in tier]
            pick = fastest(subset) if RoutingPolicy(policy) is RoutingPolicy.fastest else p2c(subset, rng)
            return tier[pick]
    return None
