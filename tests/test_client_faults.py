"""ModelServer under faults, against real simulated replicas (kill -9, SIGSTOP, 500s, slowness)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from _client_sims import MESSAGES, dead_ports, fleet_with_firewalled_control, sims_running, wait_for

from model_server.client import GroupUnavailableError, ModelServer
from model_server.client.breaker import BreakerState


def _hammer(ms: ModelServer, total: int, threads: int, on_progress=None) -> tuple[list[str], list[BaseException]]:
    """`total` chat requests from `threads` threads; returns replies and errors."""
    replies: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            text = ms.get_completion_or_embedding("8", MESSAGES, max_tokens=8)
            with lock:
                replies.append(text)
        except BaseException as err:  # noqa: BLE001 - collected and asserted on
            with lock:
                errors.append(err)

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(one, i) for i in range(total)]
        if on_progress is not None:
            on_progress(lambda: len(replies) + len(errors))
        for f in futures:
            f.result(timeout=90)
    return replies, errors


@pytest.mark.timeout(90)
@pytest.mark.parametrize("routing", ["fastest", "p2c"])
def test_kill_9_of_a_replica_under_16_threads_loses_no_request(routing: str) -> None:
    with sims_running(3) as sims:
        by_name = {f"8-{i}": s for i, s in enumerate(sims)}
        ms = ModelServer(fleet_with_firewalled_control({"8": ("completion", [s.port for s in sims])}, routing=routing))
        killed: list[str] = []

        def kill_busiest(done) -> None:
            wait_for(lambda: done() >= 100, what="100 answers")
            stats = ms.stats()["8"]
            victim = max(stats, key=lambda n: stats[n].attempts)  # under fastest: the one carrying the traffic
            by_name[victim].kill()
            killed.append(victim)

        with ms:
            replies, errors = _hammer(ms, 400, 16, kill_busiest)
            stats = ms.stats()["8"]
            victim = killed[0]
            assert stats[victim].breaker is BreakerState.OPEN and stats[victim].failures >= 1
            # Once its death is known (breaker open), the victim gets no attempt at all.
            replies2, errors2 = _hammer(ms, 60, 8)
            after = ms.stats()["8"]
        assert errors == [] and len(replies) == 400 and all(replies)
        assert errors2 == [] and len(replies2) == 60
        assert not by_name[victim].is_alive()
        assert after[victim].attempts == stats[victim].attempts
        assert (
            sum(s.successes for n, s in after.items() if n != victim)
            - sum(s.successes for n, s in stats.items() if n != victim)
            == 60
        )


@pytest.mark.timeout(90)
def test_a_hung_replica_and_a_flaky_one_lose_no_request_and_the_hung_one_is_cut_off() -> None:
    with sims_running(3) as sims:
        hung, flaky, good = sims
        # A cooldown no test run outlives: the hung replica's breaker must stay open for the whole test.
        fleet = fleet_with_firewalled_control(
            {"8": ("completion", [s.port for s in sims])}, routing="p2c", breaker_cooldown_s=86400
        )
        ms = ModelServer(fleet)
        try:
            ms.warmup()
            hung.suspend()
            flaky.set_faults(error_rate=0.5)
            replies, errors = _hammer(ms, 400, 16)
            assert errors == [] and len(replies) == 400
            stats = ms.stats()["8"]
            assert stats["8-0"].breaker is BreakerState.OPEN
            assert stats["8-0"].attempts >= 3  # it did get traffic until its breaker opened...
            assert stats["8-1"].failures > 0  # the flaky one's 500s were seen and held against it
            cut_off_at = stats["8-0"].attempts
            replies, errors = _hammer(ms, 60, 8)
            assert errors == [] and len(replies) == 60
            assert ms.stats()["8"]["8-0"].attempts == cut_off_at  # ...and none after
            assert good.stats()["requests_total"] > 0
        finally:
            hung.resume()
            ms.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("routing", ["fastest", "p2c"])
def test_a_10x_slower_replica_gets_a_small_share(routing: str) -> None:
    # Latencies well above the HTTP overhead, so that slow_factor 10 really is 10x end to end.
    with sims_running(3, args=("--ttft-ms", "20", "--tpot-ms", "2", "--tpot-growth", "0.01")) as sims:
        sims[2].set_faults(slow_factor=10)
        with ModelServer(
            fleet_with_firewalled_control({"8": ("completion", [s.port for s in sims])}, routing=routing)
        ) as ms:
            ms.warmup()
            replies, errors = _hammer(ms, 200, 8)
            stats = ms.stats()["8"]
        assert errors == [] and len(replies) == 200
        slow_share = stats["8-2"].successes / 200
        assert slow_share < 0.10, f"{routing}: the slow replica answered {slow_share:.0%}"  # uniform would be 33%
        if routing == "p2c":  # p2c spreads the rest over both fast replicas
            assert min(stats["8-0"].successes, stats["8-1"].successes) > 30


@pytest.mark.timeout(60)
def test_every_replica_down_raises_in_bounded_time_and_clears_is_running(tmp_path) -> None:
    state = tmp_path / "run" / "state.json"
    state.parent.mkdir()
    state.write_text(json.dumps({"is_running": True, "job": "nightly", "step": 7}))
    fleet = fleet_with_firewalled_control({"8": ("completion", dead_ports(3))})
    with ModelServer(fleet, state_path=state) as ms:
        started = time.monotonic()
        with pytest.raises(GroupUnavailableError) as info:
            ms.chat("8", MESSAGES, max_tokens=4)
        elapsed = time.monotonic() - started
    assert elapsed < 10, elapsed
    assert json.loads(state.read_text()) == {"is_running": False, "job": "nightly", "step": 7}
    assert info.value.group == "8" and info.value.attempts
    assert all(a.elapsed_s >= 0 for a in info.value.attempts)
    assert "probe of every replica" in str(info.value)


@pytest.mark.timeout(60)
def test_warmup_of_a_dead_group_names_each_replica_and_its_error() -> None:
    with ModelServer(fleet_with_firewalled_control({"8": ("completion", dead_ports(2))})) as ms:
        with pytest.raises(GroupUnavailableError) as info:
            ms.warmup()
    assert [a.replica for a in info.value.attempts] == ["8-0", "8-1"]
    assert all("connection error" in a.error for a in info.value.attempts)


@pytest.mark.timeout(60)
def test_hung_replicas_give_up_within_the_deadline_and_retry_budget(tmp_path) -> None:
    state = tmp_path / "state.json"
    with sims_running(2) as sims:
        fleet = fleet_with_firewalled_control(
            {"8": ("completion", [s.port for s in sims])}, request_deadline_s=3.0, run_state_file=str(state)
        )
        ms = ModelServer(fleet)
        try:
            ms.warmup()
            for s in sims:
                s.suspend()
            started = time.monotonic()
            with pytest.raises(GroupUnavailableError) as info:
                ms.chat("8", MESSAGES, max_tokens=4)
            elapsed = time.monotonic() - started
            assert elapsed < 3.0 + 7.0, elapsed  # the deadline, plus generous slack for a loaded 2-core box
            assert any("timeout" in a.error for a in info.value.attempts)
            assert json.loads(state.read_text()) == {"is_running": False}
        finally:
            for s in sims:
                s.resume()
            ms.close(timeout_s=1)


@pytest.mark.timeout(90)
def test_a_replica_that_slows_down_is_marked_degraded_and_traffic_moves(caplog) -> None:
    with sims_running(2) as sims:
        fleet = fleet_with_firewalled_control({"8": ("completion", [s.port for s in sims])}, degraded_latency_factor=4)
        with ModelServer(fleet) as ms:
            ms.warmup()
            for _ in range(10):
                ms.chat("8", MESSAGES, max_tokens=16)
            stats = ms.stats()["8"]
            busy = max(stats, key=lambda n: stats[n].successes)
            other = next(n for n in stats if n != busy)
            sims[int(busy[-1])].set_faults(slow_factor=30)
            with caplog.at_level("WARNING", logger="model_server.client"):
                for _ in range(20):
                    ms.chat("8", MESSAGES, max_tokens=16)
            before = ms.stats()["8"][other].successes
            for _ in range(10):
                ms.chat("8", MESSAGES, max_tokens=16)
            after = ms.stats()["8"][other].successes
        assert any("degraded" in r.getMessage() and busy in r.getMessage() for r in caplog.records)
        assert after - before >= 8  # the healthy replica carries the traffic now
