"""Benchmark 6: the client's side of the fault matrix, each fault measured on its own.

Three simulated replicas (TTFT 40 ms, 4 ms a token, as configs/local.toml),
ModelServer with the default client policy (no [client] section) unless a
row says otherwise, 8 threads of non-streamed chat (streamed under the hood)
or streams. Each row is one fault: what the caller saw (failed requests, the
longest wait) and how long until the fleet was whole again from the
client's side. No pipeline here: `benchmarks/pipeline_recovery.py` measures
the pipeline's side (time to READY again).

    python benchmarks/fault_matrix.py
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import _common

from model_server.client import GroupUnavailableError, ModelServer
from model_server.config import load_fleet
from model_server.sim.process import SimProcess

SIM_ARGS = ("--ttft-ms", "40", "--tpot-ms", "4")
THREADS = 8


class Load:
    """Chats (or streams) from THREADS threads until stopped: latencies, errors, completion times."""

    def __init__(self, ms: ModelServer, stream: bool = False) -> None:
        self.ms, self.stream = ms, stream
        self.records: list[tuple[float, float]] = []  # (end time, latency)
        self.errors: list[str] = []
        self._halt = threading.Event()
        self._pool = ThreadPoolExecutor(THREADS)
        self._lock = threading.Lock()

    def _one(self, i: int) -> None:
        messages = [{"role": "user", "content": f"Request {i}: say something."}]
        while not self._halt.is_set():
            started = time.monotonic()
            try:
                if self.stream:
                    "".join(self.ms.stream_chat("8", messages, max_tokens=48, temperature=0))
                else:
                    self.ms.chat("8", messages, max_tokens=16, temperature=0)
                with self._lock:
                    self.records.append((time.monotonic(), time.monotonic() - started))
            except Exception as err:  # noqa: BLE001 - counted
                with self._lock:
                    self.errors.append(type(err).__name__)

    def __enter__(self) -> Load:
        for i in range(THREADS):
            self._pool.submit(self._one, i)
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self._pool.shutdown(wait=True)

    def served_since(self, t: float) -> int:
        return sum(1 for end, _ in self.records if end >= t)

    def max_latency_after(self, t: float) -> float:
        return max((lat for end, lat in self.records if end >= t), default=0.0)


def _fleet(stack: ExitStack, sims: list[SimProcess], client: dict[str, Any] | None = None) -> ModelServer:
    path = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "fleet.toml"
    path.write_text(_common.sim_fleet(sims, client=client), encoding="utf-8")
    return stack.enter_context(ModelServer(load_fleet(path)))


def _wait(condition: Callable[[], bool], timeout_s: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if condition():
            return time.monotonic() - started
        time.sleep(0.02)
    return None


def kill_one() -> dict:
    with ExitStack() as stack:
        sims = _common.start_sims(stack, 3, SIM_ARGS)
        ms = _fleet(stack, sims)
        ms.warmup()
        with Load(ms) as load:
            time.sleep(2.0)  # steady load before the fault (a measured window, not a synchronisation)
            fault = time.monotonic()
            sims[0].kill()
            cut_off = _wait(lambda: ms.stats()["8"]["r1"].breaker.value == "open", 30)
            time.sleep(2.0)
        return {
            "fault": "kill -9 of one replica",
            "failed": len(load.errors),
            "longest_wait_s": load.max_latency_after(fault),
            "recovered_s": cut_off,
            "recovered_means": "breaker open: no more attempts on it",
        }


def stop_one() -> dict:
    with ExitStack() as stack:
        sims = _common.start_sims(stack, 3, SIM_ARGS)
        ms = _fleet(stack, sims)
        ms.warmup()
        with Load(ms) as load:
            time.sleep(2.0)
            fault = time.monotonic()
            sims[0].suspend()
            cut_off = _wait(lambda: ms.stats()["8"]["r1"].breaker.value == "open", 30)
            time.sleep(2.0)
            sims[0].resume()
            back = _wait(lambda: ms.stats()["8"]["r1"].breaker.value == "closed", 30)
        return {
            "fault": "SIGSTOP of one replica (hung), SIGCONT after",
            "failed": len(load.errors),
            "longest_wait_s": load.max_latency_after(fault),
            "recovered_s": cut_off,
            "recovered_means": f"breaker open; back in rotation {back:.1f} s after SIGCONT" if back else "breaker open",
        }


def drops() -> dict:
    with ExitStack() as stack:
        sims = _common.start_sims(stack, 3, SIM_ARGS)
        ms = _fleet(stack, sims)
        ms.warmup()
        with Load(ms, stream=True) as load:
            fault = time.monotonic()
            sims[0].set_faults(drop_stream_rate=0.5)
            time.sleep(6.0)
        return {
            "fault": "streams cut mid-answer on one replica (50 %)",
            "failed": len(load.errors),
            "longest_wait_s": load.max_latency_after(fault),
            "recovered_s": 0.0,
            "recovered_means": "each cut stream resumed on another replica",
        }


def down_at_start() -> dict:
    with ExitStack() as stack:
        sims = _common.start_sims(stack, 3, SIM_ARGS)
        sims[2].suspend()
        ms = _fleet(stack, sims)
        ms.warmup()
        with Load(ms) as load:
            sims[2].resume()
            back = _wait(lambda: ms.stats()["8"]["r3"].successes > 0, 60)
        return {
            "fault": "one replica down when the client started, back later",
            "failed": len(load.errors),
            "longest_wait_s": max((lat for _, lat in load.records), default=0.0),
            "recovered_s": back,
            "recovered_means": f"serving again (client.reprobe_interval_s = {ms.policy.reprobe_interval_s:g})",
        }


def fleet_restart() -> dict:
    with ExitStack() as stack:
        sims = _common.start_sims(stack, 3, SIM_ARGS)
        ms = _fleet(stack, sims)
        ms.warmup()
        with Load(ms) as load:
            time.sleep(1.0)
            fault = time.monotonic()
            for s in sims:
                s.kill()
            time.sleep(3.0)  # the outage a pipeline restart takes
            fresh = [SimProcess(served_model_name="chat", port=s.port, args=SIM_ARGS) for s in sims]
            for s in fresh:
                stack.callback(s.stop)
                s.start(wait=False)
            back = _wait(lambda: load.served_since(fault + 3.0) > 20, 60)
            time.sleep(1.0)
        return {
            "fault": "every replica killed, restarted after 3 s",
            "failed": len(load.errors),
            "longest_wait_s": load.max_latency_after(fault),
            "recovered_s": 3.0 + (back or 0.0),
            "recovered_means": "answers flowing again after the restart",
        }


def all_hung() -> dict:
    with ExitStack() as stack:
        sims = _common.start_sims(stack, 3, SIM_ARGS)
        ms = _fleet(stack, sims)
        ms.warmup()
        for s in sims:
            s.suspend()
        started = time.monotonic()
        try:
            ms.chat("8", [{"role": "user", "content": "hello"}], max_tokens=4)
            outcome = "answered"
        except GroupUnavailableError:
            outcome = "GroupUnavailableError"
        elapsed = time.monotonic() - started
        for s in sims:
            s.resume()
        return {
            "fault": "every replica hung",
            "failed": 1 if outcome != "answered" else 0,
            "longest_wait_s": elapsed,
            "recovered_s": None,
            "recovered_means": f"{outcome} after client.wait_for_replica_s = {ms.policy.wait_for_replica_s:g}",
        }


def mixed() -> dict:
    with ExitStack() as stack:
        sims = _common.start_sims(stack, 3, SIM_ARGS)
        ms = _fleet(stack, sims)
        ms.warmup()
        sims[0].set_faults(error_rate=0.5)
        sims[1].set_faults(malformed_rate=1.0)
        sims[2].suspend()
        with Load(ms) as load:
            time.sleep(8.0)
        sims[2].resume()
        lat = sorted(latency for _, latency in load.records)
        return {
            "fault": "one replica 50 % HTTP 500, one malformed, one hung",
            "failed": len(load.errors),
            "longest_wait_s": lat[-1] if lat else None,
            "recovered_s": None,
            "recovered_means": f"p50 {statistics.median(lat) * 1000:.0f} ms, p99 {lat[int(0.99 * len(lat))] * 1000:.0f} ms over {len(lat)} answers",
        }


def main() -> None:
    _common.quiet_logs()
    started = time.monotonic()
    rows = [case() for case in (kill_one, stop_one, drops, down_at_start, fleet_restart, all_hung, mixed)]
    _common.table(
        f"the client's fault matrix: 3 sims (TTFT 40 ms, 4 ms/token), {THREADS} threads, default client policy",
        ["fault", "failed", "longest wait s", "recovered after s", "meaning"],
        [[r["fault"], r["failed"], r["longest_wait_s"], r["recovered_s"], r["recovered_means"]] for r in rows],
    )
    _common.save(
        "fault_matrix",
        {"threads": THREADS, "sim_args": list(SIM_ARGS), "rows": rows, "wall_s": time.monotonic() - started},
    )


if __name__ == "__main__":
    main()
