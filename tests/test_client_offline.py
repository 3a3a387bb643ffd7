"""ModelServer and AsyncModelServer without sockets: fake SDK clients and probes, a fake clock.

Each test here pins a review finding and failed before its fix.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest
from _client_sims import MESSAGES, fleet_of

import model_server.client.async_driver
import model_server.client.sync_driver
from model_server.client.async_driver import AsyncModelServer
from model_server.client import GroupUnavailableError, ModelServer
from model_server.client.replica_group import ProbeResult


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _event(content: str | None, tokens: int | None = None) -> bytes:
    event: dict = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "chat",
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": content}, "finish_reason": None}]}
    if tokens is not None:
        event["choices"] = []
        event["usage"] = {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": 3 + tokens}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def _replicas(clock: FakeClock) -> dict[int, Callable[[], list[bytes]]]:
    # 8-0 (port 1) sends role-only chunks for ever (well: 5000, each 1 s later on the fake clock); 8-1 answers.
    return {1: lambda: [_event(None)] * 5000, 2: lambda: [_event("hi"), _event(None, tokens=1), b"data: [DONE]\n\n"]}


def _ticking(events: list[bytes], clock: FakeClock, step_s: float) -> Iterator[bytes]:
    for e in events:
        clock.now += step_s
        yield e


async def _aticking(events: list[bytes], clock: FakeClock, step_s: float) -> AsyncIterator[bytes]:
    for e in _ticking(events, clock, step_s):
        yield e


def _transport(clock: FakeClock, is_async: bool) -> httpx.MockTransport:
    replicas = _replicas(clock)

    def handler(request: httpx.Request) -> httpx.Response:
        events = replicas[request.url.port]()
        step = 1.0 if request.url.port == 1 else 0.001
        body = _aticking(events, clock, step) if is_async else _ticking(events, clock, step)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    return httpx.MockTransport(handler)


def _built(client, clock: FakeClock):
    """The client with group "8" (8-0 fastest, then 8-1) built from fake probes."""
    g = client._core.group("8")
    specs = g.specs
    g.apply_probes([ProbeResult(specs[0], 0.01, output_tokens=1), ProbeResult(specs[1], 0.02, output_tokens=1)])
    return g


FLEET = fleet_of({"8": ("completion", [1, 2])}, routing="fastest", retry_backoff_initial_ms=0, retry_backoff_max_ms=0)


@pytest.mark.timeout(20)
def test_sync_stream_of_endless_empty_chunks_misses_its_first_token_deadline_and_fails_over() -> None:
    clock = FakeClock()
    ms = ModelServer(FLEET, clock=clock, transport=_transport(clock, is_async=False))
    try:
        _built(ms, clock)
        assert "".join(ms.stream_chat("8", MESSAGES)) == "hi"
        stats = ms.stats()["8"]
        assert stats["8-0"].failures == 1 and "first token" in (stats["8-0"].last_error or "")
        assert clock.now < 10  # cut at its first-token deadline (1 s), not after 5000 s
    finally:
        ms.close()


@pytest.mark.timeout(20)
def test_async_stream_of_endless_empty_chunks_misses_its_first_token_deadline_and_fails_over() -> None:
    clock = FakeClock()

    async def main() -> tuple[str, dict]:
        async with AsyncModelServer(FLEET, clock=clock, transport=_transport(clock, is_async=True)) as ms:
            _built(ms, clock)
            text = "".join([piece async for piece in ms.stream_chat("8", MESSAGES)])
            return text, ms.stats()["8"]

    text, stats = asyncio.run(main())
    assert text == "hi" and stats["8-0"].failures == 1 and clock.now < 10


@pytest.mark.timeout(20)
def test_bad_chat_parameters_are_refused_before_any_attempt() -> None:
    clock = FakeClock()
    with ModelServer(FLEET, clock=clock) as ms:
        _built(ms, clock)
        with pytest.raises(TypeError, match="stream"):
            ms.chat("8", MESSAGES, stream=True)
        with pytest.raises(TypeError, match="model"):
            ms.stream_chat("8", MESSAGES, model="other")  # at the call, not at the first next()
        assert all(s.attempts == 0 and s.in_flight == 0 for s in ms.stats()["8"].values())


def _refusing_probes(seen: list[float], clock: FakeClock):
    def probe(specs, timeout_s, **kwargs):
        seen.append(timeout_s)
        clock.now += 0.01
        return [ProbeResult(s, None, error="connection error: refused") for s in specs]

    return probe


def _advance(clock: FakeClock):
    def sleep(delay_s: float) -> None:
        clock.now += delay_s

    return sleep


DEADLINED = fleet_of({"8": ("completion", [1, 2])}, initial_latency_s=100, request_timeout_ceiling_s=600,
                     request_deadline_s=0.3, build_rounds=1)


@pytest.mark.timeout(20)
def test_sync_probe_rounds_and_the_wait_for_them_keep_to_the_request_deadline(monkeypatch) -> None:
    seen: list[float] = []
    clock = FakeClock()
    monkeypatch.setattr(model_server.client.sync_driver, "probe_group", _refusing_probes(seen, clock))
    with ModelServer(DEADLINED, clock=clock, sleep=_advance(clock)) as ms:
        with pytest.raises(GroupUnavailableError):
            ms.chat("8", MESSAGES)
        assert seen and max(seen) <= 0.3  # not the 100 s bound
        lock = ms._probe_locks["8"]
        assert lock.acquire(timeout=5)  # another caller's probe round is running (and hangs)
        try:
            clock.now = 0.0
            started = time.monotonic()
            with pytest.raises(GroupUnavailableError):
                ms.chat("8", MESSAGES)
            assert time.monotonic() - started < 5  # waited about the 0.3 s left, not 100 s + slack
        finally:
            lock.release()


@pytest.mark.timeout(20)
def test_async_probe_rounds_and_the_wait_for_them_keep_to_the_request_deadline(monkeypatch) -> None:
    seen: list[float] = []
    clock = FakeClock()
    sync_probe = _refusing_probes(seen, clock)

    async def aprobe(specs, timeout_s, **kwargs):
        return sync_probe(specs, timeout_s)

    async def asleep(delay_s: float) -> None:
        clock.now += delay_s

    monkeypatch.setattr(model_server.client.async_driver, "aprobe_group", aprobe)

    async def main() -> float:
        async with AsyncModelServer(DEADLINED, clock=clock, sleep=asleep) as ms:
            with pytest.raises(GroupUnavailableError):
                await ms.chat("8", MESSAGES)
            lock = ms._probe_locks["8"]
            await lock.acquire()  # another task's probe round is running (and hangs)
            clock.now = 0.0
            started = time.monotonic()
            try:
                with pytest.raises(GroupUnavailableError):
                    await ms.chat("8", MESSAGES)
            finally:
                lock.release()
            return time.monotonic() - started

    assert asyncio.run(asyncio.wait_for(main(), 15)) < 5
    assert seen and max(seen) <= 0.3
