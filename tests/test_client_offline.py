"""ModelServer and AsyncModelServer without sockets: a fake transport, fake probes, a fake clock (public seams only).

Each test here pins a review finding and failed before its fix.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest
from _client_sims import MESSAGES, fleet_of
from _waiting import wait_for

from model_server.client import AsyncModelServer, GroupUnavailableError, ModelServer
from model_server.client.replica_group import ProbeResult
from model_server.errors import InvalidRequestError, RequestRejectedError, UnknownGroupError


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _event(content: str | None, tokens: int | None = None) -> bytes:
    event: dict = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "chat",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": content}, "finish_reason": None}],
    }
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


def _fastest_first(specs, timeout_s, **kwargs):
    """Probes that find group "8" up, 8-0 the fastest, then 8-1."""
    return [ProbeResult(s, 0.01 * (i + 1), output_tokens=1) for i, s in enumerate(specs)]


async def _afastest_first(specs, timeout_s, **kwargs):
    return _fastest_first(specs, timeout_s)


FLEET = fleet_of({"8": ("completion", [1, 2])}, routing="fastest", retry_backoff_initial_ms=0, retry_backoff_max_ms=0)


@pytest.mark.timeout(20)
def test_sync_stream_of_endless_empty_chunks_misses_its_first_token_deadline_and_fails_over() -> None:
    clock = FakeClock()
    ms = ModelServer(FLEET, clock=clock, transport=_transport(clock, is_async=False), prober=_fastest_first)
    try:
        ms.warmup()
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
        transport = _transport(clock, is_async=True)
        async with AsyncModelServer(FLEET, clock=clock, transport=transport, prober=_afastest_first) as ms:
            await ms.warmup()
            text = "".join([piece async for piece in ms.stream_chat("8", MESSAGES)])
            return text, ms.stats()["8"]

    text, stats = asyncio.run(main())
    assert text == "hi" and stats["8-0"].failures == 1 and clock.now < 10


@pytest.mark.timeout(20)
def test_bad_chat_parameters_are_refused_before_any_attempt() -> None:
    clock = FakeClock()
    with ModelServer(FLEET, clock=clock, prober=_fastest_first) as ms:
        ms.warmup()
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


DEADLINED = fleet_of(
    {"8": ("completion", [1, 2])},
    initial_latency_s=100,
    request_timeout_ceiling_s=600,
    request_deadline_s=0.3,
    build_rounds=1,
)


class _HangingProbes:
    """Probes that refuse, except the round started while ``hang`` is set: it holds the lock until ``release``."""

    def __init__(self, seen: list[float], clock: FakeClock) -> None:
        self.refuse = _refusing_probes(seen, clock)
        self.hang = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, specs, timeout_s, **kwargs):
        if self.hang:
            self.hang = False
            self.entered.set()
            self.release.wait(10)
            return [ProbeResult(s, None, error="connection error: refused") for s in specs]  # not a request's round
        return self.refuse(specs, timeout_s)


@pytest.mark.timeout(20)
def test_sync_probe_rounds_and_the_wait_for_them_keep_to_the_request_deadline() -> None:
    seen: list[float] = []
    clock = FakeClock()
    probes = _HangingProbes(seen, clock)
    with ModelServer(DEADLINED, clock=clock, sleep=_advance(clock), prober=probes) as ms:
        with pytest.raises(GroupUnavailableError):
            ms.chat("8", MESSAGES)
        assert seen and max(seen) <= 0.3  # not the 100 s bound
        probes.hang = True  # another caller's probe round is running (and hangs), holding the probe lock
        other = threading.Thread(target=lambda: pytest.raises(GroupUnavailableError, ms.warmup), daemon=True)
        other.start()
        wait_for(probes.entered.is_set, 5, "the other caller's probe round to start")
        try:
            clock.now = 0.0
            started = time.monotonic()
            with pytest.raises(GroupUnavailableError):
                ms.chat("8", MESSAGES)
            assert time.monotonic() - started < 5  # waited about the 0.3 s left, not 100 s + slack
        finally:
            probes.release.set()
            other.join(10)


@pytest.mark.timeout(20)
def test_async_probe_rounds_and_the_wait_for_them_keep_to_the_request_deadline() -> None:
    seen: list[float] = []
    clock = FakeClock()
    refuse = _refusing_probes(seen, clock)

    async def asleep(delay_s: float) -> None:
        clock.now += delay_s

    async def main() -> float:
        release, entered = asyncio.Event(), asyncio.Event()
        hang = [False]

        async def aprobe(specs, timeout_s, **kwargs):
            if hang[0]:
                hang[0] = False
                entered.set()
                await asyncio.wait_for(release.wait(), 10)
                return [ProbeResult(s, None, error="connection error: refused") for s in specs]  # not a request's
            return refuse(specs, timeout_s)

        async with AsyncModelServer(DEADLINED, clock=clock, sleep=asleep, prober=aprobe) as ms:
            with pytest.raises(GroupUnavailableError):
                await ms.chat("8", MESSAGES)
            hang[0] = True  # another task's probe round is running (and hangs), holding the probe lock
            other = asyncio.ensure_future(ms.warmup())
            await asyncio.wait_for(entered.wait(), 5)
            clock.now = 0.0
            started = time.monotonic()
            try:
                with pytest.raises(GroupUnavailableError):
                    await ms.chat("8", MESSAGES)
            finally:
                release.set()
                with pytest.raises(GroupUnavailableError):
                    await asyncio.wait_for(other, 10)
            return time.monotonic() - started

    assert asyncio.run(asyncio.wait_for(main(), 15)) < 5
    assert seen and max(seen) <= 0.3


def test_the_async_client_raises_a_bad_argument_where_the_call_is_awaited() -> None:
    async def main() -> list[str]:
        seen = []
        async with AsyncModelServer(FLEET, prober=_afastest_first) as ms:
            for call in (
                lambda: ms.chat("no-such-group", MESSAGES),
                lambda: ms.embed("8", None),
                lambda: ms.get_completion_or_embedding("8", "not messages"),
            ):
                pending = call()  # as for any `async def`: nothing is raised until it is awaited
                with pytest.raises((UnknownGroupError, InvalidRequestError, RequestRejectedError)):
                    await pending
                seen.append("raised on await")
        return seen

    assert asyncio.run(asyncio.wait_for(main(), 10)) == ["raised on await"] * 3


class _BreakingBody(httpx.SyncByteStream):
    """A body that fails mid-read, and says whether it was closed."""

    def __init__(self) -> None:
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield b'{"data": ['
        raise httpx.ReadError("connection reset")

    def close(self) -> None:
        self.closed = True


def test_an_embedding_attempt_that_fails_mid_read_frees_its_connection_before_the_backoff() -> None:
    fleet = fleet_of(
        {"7": ("embedding", [1, 2])}, routing="fastest", retry_backoff_initial_ms=100, retry_backoff_max_ms=100
    )
    broken: list[_BreakingBody] = []
    vector = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}],
        "usage": {"prompt_tokens": 1, "total_tokens": 1},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.port == 1:
            broken.append(_BreakingBody())
            return httpx.Response(200, headers={"content-type": "application/json"}, stream=broken[-1])
        return httpx.Response(200, json=vector)

    closed_at_backoff: list[bool] = []

    def sleep(delay_s: float) -> None:
        closed_at_backoff.append(all(b.closed for b in broken))

    with ModelServer(fleet, transport=httpx.MockTransport(handler), prober=_fastest_first, sleep=sleep) as ms:
        ms.warmup()
        assert ms.embed("7", "hello") == [0.5, 0.25]
    assert broken and closed_at_backoff == [True]  # not held open through the backoff and the next attempt
