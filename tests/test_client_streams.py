"""Streams that never stall and never break (issue 8), on real simulated replicas.

kill -9, SIGSTOP, dropped connections and stalls hit streams after their first
token; the caller's iterator goes on from another replica, and the text is the
text of the same request on a fleet that never failed (the simulator's filler is
a pure function of the context, as a greedy model's answer is).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from _client_sims import fleet_of, sims_running, wait_for

from model_server.client import ModelServer, StreamInterruptedError
from model_server.client.async_driver import AsyncModelServer
from model_server.config import parse_fleet

# Slow enough that a stream lasts about a second, so faults land in the middle of streams.
STREAM_ARGS = ("--ttft-ms", "20", "--tpot-ms", "15", "--tpot-growth", "0.0")
TOKENS = 60
N_STREAMS = 50
# Drops are random: enough resumes that 50 streams never run out of them by chance (the default is 2).
RESUMING = {"max_resumes": 6, "max_retry": 30}


def _prompt(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Tell me story number {i}."}]


def _expected(fleet, n: int) -> list[str]:
    """The answers of a fleet that never fails."""
    with ModelServer(fleet) as ms, ThreadPoolExecutor(8) as pool:
        return list(
            pool.map(
                lambda i: ms.chat("8", _prompt(i), max_tokens=TOKENS, temperature=0).choices[0].message.content,
                range(n),
            )
        )


def _inject_faults(sims, started: callable) -> None:
    """Once streams are flowing: kill -9 one replica, SIGSTOP another, drop streams at random on the third."""
    wait_for(lambda: started() >= 15, timeout_s=30, what="15 streams with text")
    sims[0].kill()
    sims[1].suspend()
    sims[2].set_faults(drop_stream_rate=0.1)


@pytest.mark.timeout(120)
def test_50_streams_survive_a_kill_a_stop_and_drops_byte_for_byte() -> None:
    with sims_running(3, args=STREAM_ARGS) as sims:
        fleet = fleet_of({"8": ("completion", [s.port for s in sims])}, routing="p2c", **RESUMING)
        expected = _expected(fleet, N_STREAMS)
        texts: dict[int, str] = {}
        errors: list[BaseException] = []
        lock = threading.Lock()
        with ModelServer(fleet) as ms:
            ms.warmup()

            def one(i: int) -> None:
                pieces: list[str] = []
                try:
                    for piece in ms.stream_chat("8", _prompt(i), max_tokens=TOKENS, temperature=0):
                        pieces.append(piece)
                        if len(pieces) == 1:
                            with lock:
                                texts.setdefault(-1 - i, "")  # started
                except BaseException as err:  # noqa: BLE001 - collected and asserted on
                    with lock:
                        errors.append(err)
                with lock:
                    texts[i] = "".join(pieces)

            started = lambda: sum(1 for k in list(texts) if k < 0)  # noqa: E731
            with ThreadPoolExecutor(N_STREAMS) as pool:
                futures = [pool.submit(one, i) for i in range(N_STREAMS)]
                _inject_faults(sims, started)
                for f in futures:
                    f.result(timeout=90)
            sims[1].resume()
            resumes = sum(s.failures for s in ms.stats()["8"].values())
        assert errors == []
        assert [texts[i] for i in range(N_STREAMS)] == expected
        assert resumes >= 1  # the faults really hit streams in flight


@pytest.mark.timeout(120)
def test_50_async_streams_survive_a_kill_a_stop_and_drops_byte_for_byte() -> None:
    with sims_running(3, args=STREAM_ARGS) as sims:
        fleet = fleet_of({"8": ("completion", [s.port for s in sims])}, routing="p2c", **RESUMING)
        expected = _expected(fleet, N_STREAMS)
        started: set[int] = set()

        async def main() -> tuple[list[str], list[BaseException]]:
            async with AsyncModelServer(fleet) as ms:
                await ms.warmup()

                async def one(i: int) -> str:
                    pieces = []
                    async for piece in ms.stream_chat("8", _prompt(i), max_tokens=TOKENS, temperature=0):
                        pieces.append(piece)
                        started.add(i)
                    return "".join(pieces)

                tasks = [asyncio.create_task(one(i)) for i in range(N_STREAMS)]
                await asyncio.get_running_loop().run_in_executor(None, _inject_faults, sims, lambda: len(started))
                results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 90)
            texts = [r for r in results if isinstance(r, str)]
            return texts, [r for r in results if isinstance(r, BaseException)]

        texts, errors = asyncio.run(main())
        sims[1].resume()
        assert errors == [] and texts == expected


@pytest.mark.timeout(60)
def test_a_replica_that_stalls_after_5_tokens_is_resumed_within_the_stall_deadline_and_one_backoff() -> None:
    with sims_running(2, args=STREAM_ARGS) as sims:
        fleet = fleet_of({"8": ("completion", [s.port for s in sims])}, routing="fastest")
        with ModelServer(fleet) as ms:
            expected = ms.chat("8", _prompt(7), max_tokens=20, temperature=0).choices[0].message.content
            first = max(ms.stats()["8"].items(), key=lambda kv: kv[1].successes)[0]  # fastest keeps using it
            sims[int(first[-1])].set_faults(stall_after_tokens=5)
            arrivals: list[float] = []
            stream = ms.stream_chat("8", _prompt(7), max_tokens=20, temperature=0)
            pieces = []
            for piece in stream:
                pieces.append(piece)
                arrivals.append(time.monotonic())
            stall_s = ms.timing("8").stall_s
            policy = ms.policy
        assert "".join(pieces) == expected and stream.resumes == 1
        gap = arrivals[5] - arrivals[4]  # from the 5th token to the first token of the resumed stream
        assert stall_s <= gap <= stall_s + policy.retry_backoff_max_ms / 1000 + 1.0
        assert stream.usage is not None and stream.usage.completion_tokens == 20


@pytest.mark.timeout(120)
def test_a_sigstopped_replica_holds_no_request_past_the_first_token_deadline_with_the_default_policy() -> None:
    with sims_running(3, args=("--ttft-ms", "40", "--tpot-ms", "4")) as sims:
        table = "".join(
            f'[[servers]]\nname = "chat-{i}"\ngroup = "8"\nkind = "completion"\nhost = "127.0.0.1"\n'
            f'port = {s.port}\nmodel = "sim/test-model"\nserved_model_name = "chat"\n\n'
            for i, s in enumerate(sims)
        )
        fleet = parse_fleet(table, source="<default policy>")  # no [client] section: the defaults
        latencies: list[float] = []
        lock = threading.Lock()
        with ModelServer(fleet) as ms:
            ms.warmup()

            def one(i: int) -> None:
                started = time.monotonic()
                ms.chat("8", _prompt(i), max_tokens=16, temperature=0)
                with lock:
                    latencies.append(time.monotonic() - started)

            with ThreadPoolExecutor(8) as pool:
                list(pool.map(one, range(80)))
                sims[0].suspend()
                list(pool.map(one, range(240)))
            sims[0].resume()
            stopped = ms.stats()["8"]["chat-0"]
        assert len(latencies) == 320
        assert max(latencies) <= 2.0  # first-token deadline (1 s floor) + one backoff; was the whole 10 s hang
        assert stopped.timeouts >= 1  # the stopped replica was tried, and cut off at the deadline


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools"),
        ({"n": 2}, "n = 2"),
    ],
)
def test_requests_whose_continuation_is_another_answer_are_not_resumed_and_say_why(params: dict, reason: str) -> None:
    with sims_running(2, args=STREAM_ARGS) as sims:
        fleet = fleet_of({"8": ("completion", [s.port for s in sims])})
        for s in sims:
            s.set_faults(drop_stream_rate=1.0)
        with ModelServer(fleet) as ms:
            with pytest.raises(StreamInterruptedError) as info:
                "".join(ms.stream_chat("8", _prompt(1), max_tokens=20, temperature=0, **params))
            failures = sum(s.failures for s in ms.stats()["8"].values())
    assert reason in info.value.why_not_resumed and info.value.resumes == 0 and info.value.text
    assert failures == 1


@pytest.mark.timeout(60)
def test_an_unstreamed_chat_broken_mid_answer_is_resumed_and_its_usage_is_the_whole_answers() -> None:
    with sims_running(2, args=STREAM_ARGS) as sims:
        fleet = fleet_of({"8": ("completion", [s.port for s in sims])}, routing="fastest")
        with ModelServer(fleet) as ms:
            whole = ms.chat("8", _prompt(3), max_tokens=30, temperature=0)
            first = max(ms.stats()["8"].items(), key=lambda kv: kv[1].successes)[0]
            sims[int(first[-1])].set_faults(crash_after_tokens=10)
            resumed = ms.chat("8", _prompt(3), max_tokens=30, temperature=0)
            assert not sims[int(first[-1])].is_alive()
        assert resumed.choices[0].message.content == whole.choices[0].message.content
        assert resumed.usage.completion_tokens == 30 and resumed.usage.prompt_tokens == whole.usage.prompt_tokens
        assert resumed.choices[0].finish_reason == whole.choices[0].finish_reason == "length"


@pytest.mark.timeout(60)
def test_resume_off_keeps_todays_error() -> None:
    with sims_running(1, args=STREAM_ARGS) as sims:
        fleet = fleet_of({"8": ("completion", [sims[0].port])}, resume_streams=False)
        sims[0].set_faults(drop_stream_rate=1.0)
        with ModelServer(fleet) as ms, pytest.raises(StreamInterruptedError) as info:
            list(ms.stream_chat("8", _prompt(2), max_tokens=20))
    assert "resume_streams = false" in info.value.why_not_resumed
