"""ModelServer and AsyncModelServer without sockets: fake SDK clients and probes, a fake clock.

Each test here pins a review finding and failed before its fix.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from _client_sims import MESSAGES, fleet_of

import model_server.async_client
import model_server.client
from model_server.async_client import AsyncModelServer
from model_server.client import GroupUnavailableError, ModelServer
from model_server.replica_group import ProbeResult


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _chunk(text: str | None, tokens: int | None = None) -> SimpleNamespace:
    usage = SimpleNamespace(completion_tokens=tokens) if tokens is not None else None
    return SimpleNamespace(choices=[SimpleNamespace(delta=SimpleNamespace(role="assistant", content=text))], usage=usage)


class FakeStream:
    """A stream of chunks; each one costs `step_s` on the fake clock. Iterable both ways."""

    def __init__(self, chunks: list[SimpleNamespace], clock: FakeClock, step_s: float) -> None:
        self.chunks, self.clock, self.step_s, self.closed = chunks, clock, step_s, False

    def __iter__(self):
        for c in self.chunks:
            self.clock.now += self.step_s
            yield c

    async def _agen(self):
        for c in self.__iter__():
            yield c

    def __aiter__(self):
        return self._agen()

    def close(self):
        self.closed = True
        return _done()


def _done():
    future = None
    try:
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
    except RuntimeError:
        pass
    return future


class FakeSDK:
    """What ModelServer uses of openai.OpenAI / AsyncOpenAI: chat.completions.create."""

    def __init__(self, make_stream, is_async: bool) -> None:
        async def acreate(**kwargs):
            return make_stream()

        self.chat = SimpleNamespace(completions=SimpleNamespace(create=acreate if is_async else lambda **kw: make_stream()))


def _built(client, clock: FakeClock):
    """The client with group "8" (8-0 fastest, then 8-1) built from fake probes."""
    g = client._core.group("8")
    specs = g.specs
    g.apply_probes([ProbeResult(specs[0], 0.01, output_tokens=1), ProbeResult(specs[1], 0.02, output_tokens=1)])
    return g


def _endless_then_text(clock: FakeClock, is_async: bool) -> dict[str, FakeSDK]:
    # 8-0 sends role-only chunks forever (well: 5000, 1 s apart); 8-1 answers.
    endless = lambda: FakeStream([_chunk(None)] * 5000, clock, 1.0)  # noqa: E731
    good = lambda: FakeStream([_chunk("hi"), _chunk(None, tokens=1)], clock, 0.001)  # noqa: E731
    return {"8-0": FakeSDK(endless, is_async), "8-1": FakeSDK(good, is_async)}


FLEET = fleet_of({"8": ("completion", [1, 2])}, routing="fastest", retry_backoff_initial_ms=0, retry_backoff_max_ms=0)


@pytest.mark.timeout(20)
def test_sync_stream_of_endless_empty_chunks_times_out_and_fails_over() -> None:
    clock = FakeClock()
    ms = ModelServer(FLEET, clock=clock)
    try:
        _built(ms, clock)
        ms._clients.update(_endless_then_text(clock, is_async=False))
        assert "".join(ms.stream_chat("8", MESSAGES)) == "hi"
        stats = ms.stats()["8"]
        assert stats["8-0"].failures == 1 and "timeout" in (stats["8-0"].last_error or "")
        assert clock.now < 10  # the attempt was cut at its limit (timeout 2 s + connect 1 s), not after 5000 s
    finally:
        ms.close()


@pytest.mark.timeout(20)
def test_async_stream_of_endless_empty_chunks_times_out_and_fails_over() -> None:
    clock = FakeClock()

    async def main() -> tuple[str, dict]:
        async with AsyncModelServer(FLEET, clock=clock) as ms:
            _built(ms, clock)
            ms._clients.update(_endless_then_text(clock, is_async=True))
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


def _refusing_probes(seen: list[float]):
    def probe(specs, timeout_s, **kwargs):
        seen.append(timeout_s)
        return [ProbeResult(s, None, error="connection error: refused") for s in specs]

    return probe


DEADLINED = fleet_of({"8": ("completion", [1, 2])}, initial_latency_s=100, request_timeout_ceiling_s=600,
                     request_deadline_s=0.3, build_rounds=1)


@pytest.mark.timeout(20)
def test_sync_probe_rounds_and_the_wait_for_them_keep_to_the_request_deadline(monkeypatch) -> None:
    seen: list[float] = []
    monkeypatch.setattr(model_server.client, "probe_group", _refusing_probes(seen))
    with ModelServer(DEADLINED, clock=FakeClock()) as ms:
        with pytest.raises(GroupUnavailableError):
            ms.chat("8", MESSAGES)
        assert seen and max(seen) <= 0.3  # not the 100 s bound
        lock = ms._probe_locks["8"]
        assert lock.acquire(timeout=5)  # another caller's probe round is running (and hangs)
        try:
            started = time.monotonic()
            with pytest.raises(GroupUnavailableError):
                ms.chat("8", MESSAGES)
            assert time.monotonic() - started < 5  # waited about the 0.3 s left, not 100 s + slack
        finally:
            lock.release()


@pytest.mark.timeout(20)
def test_async_probe_rounds_and_the_wait_for_them_keep_to_the_request_deadline(monkeypatch) -> None:
    seen: list[float] = []
    sync_probe = _refusing_probes(seen)

    async def aprobe(specs, timeout_s, **kwargs):
        return sync_probe(specs, timeout_s)

    monkeypatch.setattr(model_server.async_client, "aprobe_group", aprobe)

    async def main() -> float:
        async with AsyncModelServer(DEADLINED, clock=FakeClock()) as ms:
            with pytest.raises(GroupUnavailableError):
                await ms.chat("8", MESSAGES)
            lock = ms._probe_locks["8"]
            await lock.acquire()  # another task's probe round is running (and hangs)
            started = time.monotonic()
            try:
                with pytest.raises(GroupUnavailableError):
                    await ms.chat("8", MESSAGES)
            finally:
                lock.release()
            return time.monotonic() - started

    assert asyncio.run(asyncio.wait_for(main(), 15)) < 5
    assert seen and max(seen) <= 0.3
