"""Routing policies, with a seeded random source."""

from __future__ import annotations

import math
import random
from collections import Counter

from model_server.client.routing import Candidate, choose, fastest, p2c
from model_server.config import RoutingPolicy


def _c(name: str, latency: float, in_flight: int = 0, **kw) -> Candidate:
    return Candidate(name, latency, in_flight, **kw)


def test_fastest_takes_the_lowest_latency_then_fewest_in_flight_then_table_order() -> None:
    assert fastest([_c("a", 0.3), _c("b", 0.1), _c("c", 0.2)]) == 1
    assert fastest([_c("a", 0.1, 4), _c("b", 0.1, 1)]) == 1
    assert fastest([_c("a", 0.1), _c("b", 0.1)]) == 0
    assert fastest([_c("a", math.inf), _c("b", 5.0)]) == 1  # unknown latency is worst


def test_open_breakers_are_never_chosen() -> None:
    cands = [_c("a", 0.01, available=False), _c("b", 1.0), _c("c", 2.0, available=False)]
    for policy in RoutingPolicy:
        for seed in range(20):
            assert choose(cands, policy, random.Random(seed)) == 1
    assert choose([_c("a", 0.1, available=False)], RoutingPolicy.fastest, random.Random(0)) is None


def test_untried_then_healthy_replicas_come_first() -> None:
    cands = [_c("a", 0.1), _c("b", 0.2, degraded=True), _c("c", 0.3)]
    rng = random.Random(0)
    assert choose(cands, RoutingPolicy.fastest, rng) == 0
    assert choose(cands, RoutingPolicy.fastest, rng, tried={"a"}) == 2  # c before the degraded b
    assert choose(cands, RoutingPolicy.fastest, rng, tried={"a", "c"}) == 1
    assert choose(cands, RoutingPolicy.fastest, rng, tried={"a", "b", "c"}) == 0  # all tried: best again


def test_p2c_prefers_the_lower_latency_times_load_of_two_random_picks() -> None:
    assert p2c([_c("a", 1.0, 0), _c("b", 0.2, 9)], random.Random(1)) == 0  # 1.0 < 0.2 x 10
    assert p2c([_c("a", 1.0, 0), _c("b", 0.2, 3)], random.Random(1)) == 1  # 0.8 < 1.0
    assert p2c([_c("only", 1.0)], random.Random(1)) == 0


def test_p2c_spreads_load_over_equal_replicas_and_starves_a_slow_one() -> None:
    rng = random.Random(42)
    cands = [_c("a", 0.01), _c("b", 0.01), _c("c", 0.01), _c("slow", 0.10)]
    picks = Counter(cands[choose(cands, RoutingPolicy.p2c, rng)].name for _ in range(3000))
    assert picks["slow"] == 0
    assert min(picks["a"], picks["b"], picks["c"]) > 800
    busy = [_c("a", 0.01, 12), _c("b", 0.01, 12), _c("c", 0.01, 12), _c("slow", 0.10, 0)]
    picks = Counter(busy[choose(busy, RoutingPolicy.p2c, rng)].name for _ in range(3000))
    assert 0 < picks["slow"] < 3000  # loaded fast replicas shed work to the idle slow one sometimes


def test_fastest_is_deterministic_regardless_of_rng() -> None:
    cands = [_c("a", 0.2), _c("b", 0.1)]
    assert {choose(cands, RoutingPolicy.fastest, random.Random(s)) for s in range(50)} == {1}
