"""AsyncModelServer under the same faults, against real simulated replicas."""

from __future__ import annotations

import asyncio
import json

import pytest
from _client_sims import MESSAGES, dead_ports, fleet_of, sims_running

from model_server.client import GroupUnavailableError, RequestRejectedError, StreamInterruptedError, UnknownGroupError
from model_server.client.async_driver import AsyncModelServer
from model_server.client.breaker import BreakerState


@pytest.mark.timeout(90)
@pytest.mark.parametrize("routing", ["fastest", "p2c"])
def test_kill_9_and_500s_lose_no_request(routing: str) -> None:
    with sims_running(3) as sims:
        fleet = fleet_of({"8": ("completion", [s.port for s in sims])}, routing=routing)

        async def main() -> tuple[list[str], list[BaseException], dict]:
            async with AsyncModelServer(fleet) as ms:
                await ms.warmup()
                stats = ms.stats()["8"]
                victim = min(stats, key=lambda n: stats[n].latency_s)  # fastest's choice
                # The flaky one is fastest's next choice once the victim dies, so both policies send it traffic.
                flaky = min((n for n in stats if n != victim), key=lambda n: stats[n].latency_s)
                sims[int(flaky[-1])].set_faults(error_rate=0.5)
                gate = asyncio.Semaphore(16)
                done = 0

                async def one() -> str:
                    nonlocal done
                    async with gate:
                        text = await ms.get_completion_or_embedding("8", MESSAGES, max_tokens=8)
                        done += 1
                        if done == 100:
                            sims[int(victim[-1])].kill()
                        return text

                results = await asyncio.gather(*(one() for _ in range(400)), return_exceptions=True)
                replies = [r for r in results if isinstance(r, str)]
                errors = [r for r in results if isinstance(r, BaseException)]
                return replies, errors, {"stats": ms.stats()["8"], "victim": victim, "flaky": flaky}

        replies, errors, info = asyncio.run(main())
        assert errors == [] and len(replies) == 400 and all(replies)
        stats = info["stats"]
        assert not sims[int(info["victim"][-1])].is_alive()
        assert stats[info["flaky"]].failures > 0  # its 500s were seen and held against it
        assert all(s.in_flight == 0 for s in stats.values())


@pytest.mark.timeout(60)
def test_async_streams_embeddings_rejections_and_groups() -> None:
    with sims_running(2) as sims, sims_running(1, embedding=True) as emb:
        fleet = fleet_of({"8": ("completion", [s.port for s in sims]), "7": ("embedding", [emb[0].port])})

        async def main() -> None:
            async with AsyncModelServer(fleet) as ms:
                expected = await ms.get_completion_or_embedding("8", MESSAGES, max_tokens=12)
                stats = ms.stats()["8"]
                first = min(stats, key=lambda n: stats[n].latency_s)
                sims[int(first[-1])].set_faults(error_rate=1.0)
                chunks = [c async for c in ms.stream_chat("8", MESSAGES, max_tokens=12)]
                assert len(chunks) > 1 and "".join(chunks) == expected  # failover before the first chunk
                for s in sims:
                    s.reset_faults()
                    s.set_faults(drop_stream_rate=1.0)
                received: list[str] = []
                with pytest.raises(StreamInterruptedError) as info:
                    async for c in ms.stream_chat("8", MESSAGES, max_tokens=12):
                        received.append(c)
                assert info.value.text == "".join(received) and expected.startswith(info.value.text)
                vector = await ms.get_completion_or_embedding("7", "hello", get_embedding=True)
                assert len(vector) == 256 and len(await ms.embed("7", ["a", "b", "c"])) == 3
                before = sum(s.attempts for s in ms.stats()["8"].values())
                with pytest.raises(RequestRejectedError) as rejected:
                    await ms.chat("8", MESSAGES, max_tokens=-1)
                assert rejected.value.status == 400
                assert sum(s.attempts for s in ms.stats()["8"].values()) == before + 1
                with pytest.raises(UnknownGroupError):
                    await ms.embed("70", "x")

        asyncio.run(main())


@pytest.mark.timeout(60)
def test_async_every_replica_down_raises_and_clears_is_running(tmp_path) -> None:
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"is_running": True, "owner": "me"}))
    fleet = fleet_of({"8": ("completion", dead_ports(2))})

    async def main() -> GroupUnavailableError:
        async with AsyncModelServer(fleet, state_path=state) as ms:
            with pytest.raises(GroupUnavailableError) as info:
                await asyncio.wait_for(ms.chat("8", MESSAGES), timeout=20)
            return info.value

    err = asyncio.run(main())
    assert err.attempts and json.loads(state.read_text()) == {"is_running": False, "owner": "me"}


@pytest.mark.timeout(60)
def test_async_hung_replica_is_cut_off_by_its_breaker() -> None:
    with sims_running(2) as sims:
        fleet = fleet_of({"8": ("completion", [s.port for s in sims])}, routing="p2c")

        async def main() -> dict:
            async with AsyncModelServer(fleet) as ms:
                await ms.warmup()
                sims[0].suspend()
                gate = asyncio.Semaphore(16)

                async def one() -> str:
                    async with gate:
                        return await ms.chat("8", MESSAGES, max_tokens=4)

                await asyncio.gather(*(one() for _ in range(150)))
                return ms.stats()["8"]

        try:
            stats = asyncio.run(main())
        finally:
            sims[0].resume()
        assert stats["8-0"].breaker is BreakerState.OPEN and stats["8-1"].successes == 150


def test_an_async_stream_the_caller_abandons_frees_its_replica_at_once() -> None:
    with sims_running(1) as sims:
        fleet = fleet_of({"8": ("completion", [s.port for s in sims])})

        async def main() -> list[int]:
            ms = AsyncModelServer(fleet)
            try:
                stream = ms.stream_chat("8", MESSAGES, max_tokens=50)
                async for _ in stream:
                    break
                await stream.aclose()  # no await in between: the lease must already be back
                return [s.in_flight for s in ms.stats()["8"].values()]
            finally:
                await ms.aclose()

        assert asyncio.run(asyncio.wait_for(main(), 60)) == [0]
