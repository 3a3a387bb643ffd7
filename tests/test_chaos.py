"""Chaos: a seeded random schedule of faults over 3 replicas while two clients send requests.

Engines are plain ``SimProcess`` servers (not the launch pipeline): the test
itself kills a replica and starts a new one on the same port when the fault
ends, so the run is bounded and the same for a seed (the pipeline's own
restart behaviour is measured in benchmarks/failover.py). Faults: kill -9,
hang, 500s, slow x20, malformed bodies, dropped streams; at least one
replica is always healthy (``chaos_schedule`` guarantees it, and a killed
replica counts as down until it has had time to start again).

Load: AsyncModelServer, non-streaming ``chat`` (the original application's
call shape) at 12 req/s and ``stream_chat`` at 4 req/s, open loop.

Asserted: zero failed non-streamed requests; streamed requests fail only by
the client's documented rule (a stream cut after its first token cannot fail
over: StreamInterruptedError) and only while a drop or kill fault was on;
every fault was applied; no simulator process is left at the end.
Set CHAOS_SEED to replay another schedule.
"""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import psutil
import pytest

from model_server.bench.arrivals import build_schedule
from model_server.bench.chaos import CHAOS_KINDS, ChaosFault, chaos_schedule, healthy_at
from model_server.bench.lengths import LengthRange, RequestSource
from model_server.bench.runner import LoadPlan, run_load
from model_server.bench.targets import ModelServerTarget
from model_server.client.async_driver import AsyncModelServer
from model_server.config import load_fleet
from model_server.sim.process import SimProcess, free_port

SEED = int(os.environ.get("CHAOS_SEED", "7"))
REPLICAS = 3
LOAD_S = 20.0  # seed 7 puts every kind of fault (9 of them) in the first 17 s
SIM_ARGS = ("--ttft-ms", "3", "--tpot-ms", "1", "--ttft-per-prompt-token-ms", "0")
CLIENT = """
[client]
routing = "p2c"
initial_latency_s = 1.0
latency_growing_rate = 5
build_rounds = 3
max_retry = 30
request_timeout_floor_s = 1.0
request_timeout_ceiling_s = 5.0
connect_timeout_s = 1.0
retry_backoff_initial_ms = 20
retry_backoff_max_ms = 250
breaker_failures = 3
breaker_cooldown_s = 1.0
"""


class Fleet:
    """The replicas on fixed ports; a killed one is replaced by a new process on the same port."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.sims = [self._new(p) for p in ports]
        self.every_pid: list[int] = []
        self.log: list[tuple[float, str]] = []

    def _new(self, port: int) -> SimProcess:
        return SimProcess(served_model_name="chat", port=port, args=SIM_ARGS)

    def start_all(self) -> None:
        for sim in self.sims:
            sim.start(wait=False)
            self.every_pid.append(sim.pid)
        for sim in self.sims:
            sim.wait_ready(60.0)

    def revive(self, i: int) -> None:
        self.sims[i].stop()
        sim = self.sims[i] = self._new(self.ports[i])
        sim.start(wait=False)
        self.every_pid.append(sim.pid)
        sim.wait_ready(60.0)

    def stop_all(self) -> None:
        for sim in self.sims:
            sim.stop()


REVIVAL_WAIT_S = 30.0  # a loaded 2-core machine can take far longer than the schedule's recovery_s to start a sim


async def _control(sim: SimProcess, path: str, body: dict | None, deadline_s: float = 20.0) -> str | None:
    """POST a control route, retrying connection failures until the deadline; the error text if it never worked."""
    until = time.monotonic() + deadline_s
    async with httpx.AsyncClient(timeout=3.0) as http:
        while True:
            try:
                response = await http.post(sim.url + path, json=body)
                response.raise_for_status()
                return None
            except httpx.HTTPError as err:
                if time.monotonic() >= until:
                    return f"{type(err).__name__}: {err}"
                await asyncio.sleep(0.1)


async def _run_chaos(fleet: Fleet, faults: list[ChaosFault], start: float) -> list[tuple[float, str]]:
    """Start and heal each fault at its time; returns what was done, when (and any control failure)."""
    events = sorted(
        [(f.at_s, "start", f) for f in faults] + [(f.heal_s, "heal", f) for f in faults],
        key=lambda e: (e[0], e[1] == "start"),
    )
    done: list[tuple[float, str]] = []
    revivals: dict[int, asyncio.Task] = {}
    for at_s, what, fault in events:
        delay = start + at_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        revival = revivals.pop(fault.replica, None)
        if revival is not None:  # a fault on a replica that is still starting again waits for it (bounded)
            await asyncio.wait_for(asyncio.shield(revival), REVIVAL_WAIT_S)
        sim = fleet.sims[fault.replica]
        problem = None
        if fault.kind == "kill":
            if what == "start":
                sim.kill()
            else:
                revivals[fault.replica] = asyncio.create_task(asyncio.to_thread(fleet.revive, fault.replica))
        elif what == "start":
            problem = await _control(sim, "/sim/faults", fault.sim_faults())
        else:
            problem = await _control(sim, "/sim/reset", None)
        note = f"{what} {fault.kind} r{fault.replica}" + (f" FAILED {problem}" if problem else "")
        done.append((round(time.monotonic() - start, 2), note))
    await asyncio.wait_for(asyncio.gather(*revivals.values()), REVIVAL_WAIT_S)
    return done


async def _load(fleet_path, fleet: Fleet, faults: list[ChaosFault]):
    fleet_table = load_fleet(fleet_path)
    client = AsyncModelServer(fleet_table)
    try:
        await client.warmup(["8"])
        chat = ModelServerTarget(client, "8", stream=False, close_client=False)
        stream = ModelServerTarget(client, "8", stream=True, close_client=False)
        chat_plan = LoadPlan(
            schedule=build_schedule("poisson", rate=12.0, requests=int(12 * LOAD_S), seed=SEED), request_timeout_s=60.0
        )
        stream_plan = LoadPlan(
            schedule=build_schedule("poisson", rate=4.0, requests=int(4 * LOAD_S), seed=SEED + 1),
            request_timeout_s=60.0,
        )
        source = RequestSource(prompt_len=LengthRange(8, 24), output_len=LengthRange(4, 12), seed=SEED)
        start = time.monotonic()
        return start, await asyncio.gather(
            run_load(chat, source, chat_plan),
            run_load(stream, source, stream_plan),
            _run_chaos(fleet, faults, start),
        )
    finally:
        await client.aclose()


@pytest.mark.timeout(150)
def test_chaos_zero_failures_and_no_orphans(tmp_path):
    faults = chaos_schedule(SEED, REPLICAS, duration_s=LOAD_S - 3.0, recovery_s=4.0)
    assert {f.kind for f in faults} == set(CHAOS_KINDS), faults  # the seed exercises every kind
    ports = [free_port() for _ in range(REPLICAS)]
    fleet = Fleet(ports)
    fleet_path = tmp_path / "fleet.toml"
    servers = "".join(
        f'\n[[servers]]\nname = "r{i}"\ngroup = "8"\nkind = "completion"\nhost = "127.0.0.1"\nport = {p}\n'
        'model = "sim/test-model"\nserved_model_name = "chat"\n'
        for i, p in enumerate(ports)
    )
    fleet_path.write_text(CLIENT + servers, encoding="utf-8")
    try:
        fleet.start_all()
        start, (chat_out, stream_out, done) = asyncio.run(_load(fleet_path, fleet, faults))
    finally:
        fleet.stop_all()
    # every fault was started and healed
    assert len(done) == 2 * len(faults), done
    assert not [d for d in done if "FAILED" in d[1]], done
    # the original application's call shape never fails while one replica is healthy
    chat_failed = [r for r in chat_out.records if not r.ok]
    assert len(chat_out.records) == int(12 * LOAD_S)
    assert not chat_failed, [(round(r.sent_s, 2), r.error) for r in chat_failed]
    # streams fail only when cut after their first token, and only while a drop or kill was on
    cutting = [f for f in faults if f.kind in ("drop", "kill")]
    for r in stream_out.records:
        if r.ok:
            continue
        assert "StreamInterruptedError" in r.error, r
        assert any(f.at_s - 0.5 <= r.sent_s <= f.heal_s + 0.5 for f in cutting), (r, cutting)
    streamed_ok = sum(r.ok for r in stream_out.records)
    assert streamed_ok >= 0.8 * len(stream_out.records)
    chat_p99_s = sorted(r.e2e_s for r in chat_out.records)[int(0.99 * len(chat_out.records))]
    print(
        f"chaos seed {SEED}: {len(faults)} faults {[(f.at_s, f.kind, f.replica) for f in faults]}; "
        f"chat ok {len(chat_out.records)}/{len(chat_out.records)}, stream ok {streamed_ok}/{len(stream_out.records)}, "
        f"chat e2e p99 {chat_p99_s:.3f}s"
    )
    # one replica was healthy the whole time (the schedule's promise, checked on the record)
    assert all(healthy_at(faults, REPLICAS, t / 10, recovery_s=4.0) for t in range(int(LOAD_S * 10)))
    # no orphan: every simulator process ever started is gone
    for pid in fleet.every_pid:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid
    leftovers = [p for p in psutil.Process().children(recursive=True) if "model_server" in " ".join(p.cmdline())]
    assert not leftovers, leftovers
