"""The circuit breaker state machine, on a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from model_server.client.breaker import Breaker, BreakerState


def _fail(b: Breaker, n: int, now: float) -> Breaker:
    for _ in range(n):
        trial = b.takes_trial
        b = b.acquire(now).failure(now, trial)
    return b


def test_opens_after_failures_in_a_row_only() -> None:
    b = Breaker(failures_to_open=3, cooldown_s=10)
    b = _fail(b, 2, now=0)
    assert b.state is BreakerState.CLOSED and b.consecutive_failures == 2
    b = b.acquire(0).success(0)  # a success in between resets the count
    b = _fail(b, 2, now=1)
    assert b.state is BreakerState.CLOSED
    b = _fail(b, 1, now=2)
    assert b.state is BreakerState.OPEN and b.opened_at == 2
    assert not b.allows(2) and not b.allows(11.99)


def test_half_open_lets_exactly_one_trial_through_after_the_cooldown() -> None:
    b = _fail(Breaker(failures_to_open=1, cooldown_s=5), 1, now=100)
    assert b.retry_in_s(102) == pytest.approx(3)
    assert b.allows(105)
    trial = b.acquire(105)
    assert trial.state is BreakerState.HALF_OPEN and trial.trial_in_flight
    assert not trial.allows(105.1)  # a second request must wait for the trial
    with pytest.raises(RuntimeError):
        trial.acquire(105.1)


def test_trial_success_closes_and_trial_failure_reopens_with_a_new_cooldown() -> None:
    b = _fail(Breaker(failures_to_open=2, cooldown_s=5), 2, now=0)
    assert b.takes_trial
    closed = b.acquire(5).success(6, trial=True)
    assert closed.state is BreakerState.CLOSED and closed.consecutive_failures == 0 and closed.allows(6)
    reopened = b.acquire(5).failure(6, trial=True)
    assert reopened.state is BreakerState.OPEN and reopened.opened_at == 6
    assert not reopened.allows(10.9) and reopened.allows(11)


def test_a_cancelled_trial_frees_the_slot_and_reset_closes() -> None:
    trial = _fail(Breaker(failures_to_open=1, cooldown_s=1), 1, now=0).acquire(1)
    freed = trial.release(1.5, trial=True)
    assert freed.state is BreakerState.HALF_OPEN and freed.allows(1.5)
    assert trial.reset(2).state is BreakerState.CLOSED


def test_a_late_failure_while_open_keeps_the_cooldown_running() -> None:
    b = _fail(Breaker(failures_to_open=1, cooldown_s=5), 1, now=0)
    late = b.failure(3)  # a request sent before it opened fails now
    assert late.state is BreakerState.OPEN and late.opened_at == 0


def test_a_late_success_of_a_request_sent_before_the_breaker_opened_does_not_close_it() -> None:
    b = _fail(Breaker(failures_to_open=1, cooldown_s=5), 1, now=0)
    late = b.success(1)  # sent while CLOSED, answers after the breaker opened
    assert late.state is BreakerState.OPEN and late.opened_at == 0
    trial = late.acquire(5)
    assert trial.success(5.5).state is BreakerState.HALF_OPEN  # another stale success during the trial
    assert trial.success(5.5, trial=True).state is BreakerState.CLOSED  # only the trial closes it


def test_a_late_cancel_does_not_free_the_trial_slot() -> None:
    trial = _fail(Breaker(failures_to_open=1, cooldown_s=5), 1, now=0).acquire(5)
    late = trial.release(5.5)  # a request sent before the breaker opened was cancelled
    assert late.trial_in_flight and not late.allows(5.5)  # still one trial at a time


def test_a_late_failure_during_the_trial_neither_reopens_nor_restarts_the_cooldown() -> None:
    trial = _fail(Breaker(failures_to_open=1, cooldown_s=5), 1, now=0).acquire(5)
    late = trial.failure(5.5)
    assert late.state is BreakerState.HALF_OPEN and late.trial_in_flight and late.opened_at == 0
    assert late.success(6, trial=True).state is BreakerState.CLOSED


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        Breaker(failures_to_open=0)
    with pytest.raises(ValueError):
        Breaker(cooldown_s=0)


@given(st.lists(st.sampled_from(["ok", "fail", "wait"]), max_size=60))
def test_invariants_hold_for_any_sequence(events: list[str]) -> None:
    b, now, run = Breaker(failures_to_open=3, cooldown_s=2), 0.0, 0
    for e in events:
        if e == "wait":
            now += 1
            continue
        if not b.allows(now):
            continue
        trial = b.takes_trial
        b = b.acquire(now)
        b = b.success(now, trial) if e == "ok" else b.failure(now, trial)
        run = 0 if e == "ok" else run + 1
        # open exactly when the run of failures reached the threshold (a failed trial re-opens)
        assert (b.state is BreakerState.OPEN) == (run >= 3)
        assert not b.trial_in_flight
