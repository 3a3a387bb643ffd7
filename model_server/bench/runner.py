"""The load engine: open loop (arrivals on a schedule) or closed loop (fixed concurrency).

Open loop: one dispatcher coroutine sleeps until each request's scheduled time
and starts it as its own task; it never waits for an answer, so a slow or hung
server cannot slow the offered load (it only piles up requests in flight).
A request's ``sent_s`` is taken in its task just before it goes to the target,
so ``sent_s - scheduled_s`` measures the generator's own accuracy.

Closed loop: N workers, each sending its next request when the previous one
ends, until the request count or the duration is used up.

Everything runs on one event loop; the per-request work is a few attribute
writes, so the generator is not the bottleneck at hundreds of requests/s.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from model_server.bench.arrivals import ArrivalSchedule
from model_server.bench.injector import AppliedFault, FaultInjector
from model_server.bench.lengths import BenchRequest, RequestSource
from model_server.bench.stats import RequestRecord
from model_server.bench.targets import IncompleteStream, Target
from model_server.common.aio import timeout_after, within
from model_server.errors import BenchError

__all__ = ["LoadPlan", "Progress", "RunOutcome", "run_load", "warm_up"]

_ERROR_TEXT = 120


@dataclass(frozen=True)
class LoadPlan:
    """How much load, of which kind. Exactly one of ``schedule`` (open) or ``concurrency`` (closed)."""

    schedule: ArrivalSchedule | None = None
    concurrency: int | None = None
    requests: int | None = None  # closed loop: stop after this many
    duration_s: float | None = None  # closed loop: stop sending after this long
    request_timeout_s: float = 60.0  # per request, the whole stream included
    drain_timeout_s: float = 30.0  # after the last send, wait this long for answers at most

    def __post_init__(self) -> None:
        if (self.schedule is None) == (self.concurrency is None):
            raise BenchError("give either --rate (open loop) or --concurrency (closed loop), not both and not neither.")
        if self.concurrency is not None:
            if self.concurrency < 1:
                raise BenchError(f"--concurrency is {self.concurrency}: give at least 1.")
            if self.requests is None and self.duration_s is None:
                raise BenchError("a closed-loop run needs --requests N or --duration S to know when to stop.")
        if not self.request_timeout_s > 0:
            raise BenchError(f"--timeout is {self.request_timeout_s}: give a positive number of seconds.")

    @property
    def mode(self) -> str:
        return "open" if self.schedule is not None else "closed"

    @property
    def expected_requests(self) -> int | None:
        return len(self.schedule) if self.schedule is not None else self.requests


@dataclass
class Progress:
    """Counters a progress display polls (no callback on the hot path)."""

    sent: int = 0
    done: int = 0
    failed: int = 0
    in_flight: int = 0


@dataclass
class RunOutcome:
    records: list[RequestRecord]
    faults: list[AppliedFault]
    faults_not_applied: list = field(default_factory=list)
    wall_s: float = 0.0
    plan: LoadPlan | None = None
    start_wall_s: float | None = None  # time.time() at the run's start: places log records (wall-clock) on its axis


def _describe(err: BaseException) -> str:
    status = getattr(err, "status_code", None)
    text = type(err).__name__ + (f" {status}" if status else "")
    if isinstance(err, (IncompleteStream, TimeoutError)) or not status:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if detail:
            text += f": {detail}"
    return text[:_ERROR_TEXT]


class _Run:
    def __init__(self, target: Target, plan: LoadPlan, clock: Callable[[], float]) -> None:
        self.target = target
        self.plan = plan
        self.clock = clock
        self.records: list[RequestRecord] = []
        self.progress = Progress()
        self.start = 0.0

    async def consume(self, record: RequestRecord, request: BenchRequest) -> None:
        """Stream the answer, timestamping the first content piece and counting tokens."""
        clock, start = self.clock, self.start
        tokens = 0
        reported = None
        record.timed = timed = getattr(self.target, "streams", True)
        async for piece in self.target.stream(request):
            if piece.text:
                if timed and record.first_token_s is None:
                    record.first_token_s = clock() - start
                tokens += 1
            if piece.completion_tokens is not None:
                reported = piece.completion_tokens
            if piece.server is not None:
                record.server = piece.server
        record.output_tokens = reported if reported is not None else tokens

    async def one(self, record: RequestRecord, request: BenchRequest) -> None:
        progress = self.progress
        clock, start = self.clock, self.start
        progress.in_flight += 1
        record.sent_s = clock() - start
        progress.sent += 1
        try:
            async with timeout_after(self.plan.request_timeout_s):  # in this task: wait_for would add one (< 3.12)
                await self.consume(record, request)
            record.done_s = clock() - start
            record.ok = True
        except (TimeoutError, asyncio.TimeoutError):
            record.error = f"timeout after {self.plan.request_timeout_s:g}s"
        except asyncio.CancelledError:
            record.error = "cancelled: the run ended first"
            raise
        except Exception as err:  # noqa: BLE001 - every failure of a request is data, not a crash
            record.error = _describe(err)
        finally:
            progress.in_flight -= 1
            progress.done += 1
            if not record.ok:
                progress.failed += 1
                if record.done_s is None:
                    record.done_s = clock() - start

    async def open_loop(self, schedule: ArrivalSchedule, source: RequestSource, tasks: set[asyncio.Task]) -> None:
        requests = [source.make(i) for i in range(len(schedule))]  # before the clock starts: no work on the hot path
        self.start = start = self.clock()
        for index, offset in enumerate(schedule.offsets_s):
            delay = start + offset - self.clock()
            if delay > 0:
                await asyncio.sleep(delay)
            record = RequestRecord(index, scheduled_s=offset)
            self.records.append(record)
            task = asyncio.create_task(self.one(record, requests[index]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def closed_loop(self, source: RequestSource) -> None:
        plan = self.plan
        counter = itertools.count()
        self.start = self.clock()
        deadline = self.start + plan.duration_s if plan.duration_s is not None else math.inf

        async def worker() -> None:
            while True:
                index = next(counter)
                if (plan.requests is not None and index >= plan.requests) or self.clock() >= deadline:
                    return
                record = RequestRecord(index)
                self.records.append(record)
                await self.one(record, source.make(index))

        await asyncio.gather(*(worker() for _ in range(plan.concurrency or 1)))


async def run_load(
    target: Target,
    source: RequestSource,
    plan: LoadPlan,
    *,
    injector: FaultInjector | None = None,
    progress: Progress | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> RunOutcome:
    """Run the plan against the target, with the faults on their schedule; the records of every request."""
    run = _Run(target, plan, clock)
    if progress is not None:
        run.progress = progress
    tasks: set[asyncio.Task] = set()
    fault_task: asyncio.Task | None = None
    if plan.schedule is not None:
        dispatcher = asyncio.create_task(run.open_loop(plan.schedule, source, tasks))
    else:
        dispatcher = asyncio.create_task(run.closed_loop(source))
    await asyncio.sleep(0)  # let the dispatcher set the start time
    start_wall_s = time.time() - (clock() - run.start)
    if injector is not None:
        fault_task = asyncio.create_task(injector.run(run.start, clock=clock))
    try:
        await dispatcher
        if tasks:
            await asyncio.wait(set(tasks), timeout=plan.drain_timeout_s + plan.request_timeout_s)
    finally:
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.wait(set(tasks), timeout=5.0)
        if fault_task is not None:
            fault_task.cancel()
            await asyncio.gather(fault_task, return_exceptions=True)
    wall_s = max((r.done_s for r in run.records if r.done_s is not None), default=clock() - run.start)
    return RunOutcome(
        records=sorted(run.records, key=lambda r: r.index),
        faults=list(injector.applied) if injector else [],
        faults_not_applied=injector.not_applied() if injector else [],
        wall_s=wall_s,
        plan=plan,
        start_wall_s=start_wall_s,
    )


async def warm_up(target: Target, source: RequestSource, count: int, timeout_s: float) -> int:
    """Send ``count`` requests before the clock starts (first-use costs: imports, model classes, connections).

    Failures are ignored (a fault may be the point of the run); returns how many succeeded.
    """
    succeeded = 0
    for i in range(count):
        request = source.make(-1 - i)
        try:
            await within(_drain(target, request), timeout_s)
            succeeded += 1
        except Exception:  # noqa: BLE001 - a warm-up failure is not a result
            pass
    return succeeded


async def _drain(target: Target, request: BenchRequest) -> None:
    async for _ in target.stream(request):
        pass
