"""The one backoff both halves use: doubling, capped, jittered down to a floor."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from model_server.client.retry import backoff_s
from model_server.common.backoff import jittered_backoff_s
from model_server.config import ClientPolicy


def test_doubles_then_caps() -> None:
    assert [jittered_backoff_s(n, 2.0, 120.0, lambda: 1.0) for n in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 16.0]
    assert jittered_backoff_s(10, 2.0, 120.0, lambda: 1.0) == 120.0
    assert jittered_backoff_s(10**6, 2.0, 120.0, lambda: 1.0) == 120.0  # no overflow for huge attempt counts


def test_no_delay_before_the_first_attempt() -> None:
    assert jittered_backoff_s(0, 2.0, 120.0, lambda: 1.0) == 0.0


def test_floor_share_keeps_part_of_the_delay() -> None:
    assert jittered_backoff_s(1, 2.0, 120.0, lambda: 0.0) == 0.0  # full jitter (requests)
    assert jittered_backoff_s(1, 2.0, 120.0, lambda: 0.0, floor_share=0.5) == 1.0  # restarts keep half


@given(st.integers(1, 60), st.floats(0, 100), st.floats(0, 1000), st.floats(0, 0.999999), st.sampled_from([0.0, 0.5]))
def test_stays_between_floor_and_cap(attempt: int, initial: float, cap: float, r: float, floor: float) -> None:
    base = min(cap, initial * 2 ** (attempt - 1))
    delay = jittered_backoff_s(attempt, initial, cap, lambda: r, floor_share=floor)
    assert base * floor - 1e-9 <= delay <= base + 1e-9


def test_the_client_policy_is_in_milliseconds() -> None:
    policy = ClientPolicy(retry_backoff_initial_ms=100, retry_backoff_max_ms=400)
    pinned = random.Random()
    pinned.random = lambda: 1.0  # type: ignore[method-assign]
    assert [backoff_s(n, policy, pinned) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.4, 0.4]
