"""ModelServer's API against real simulated replicas: answers, rejections, streams, embeddings, groups."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from _client_sims import MESSAGES, fleet_of, start_sims, stop_sims
from openai.types.chat import ChatCompletion
from prometheus_client import CollectorRegistry

from model_server.client import (
    GroupUnavailableError,
    ModelServer,
    RequestRejectedError,
    StreamInterruptedError,
    UnknownGroupError,
)
from model_server.client.breaker import BreakerState
from model_server.errors import ClientError, ModelServerError


@pytest.fixture(scope="module")
def sims():
    """Three chat replicas and two embedding replicas, shared by this module; faults reset per test."""
    started = start_sims(3)
    try:
        started += start_sims(2, embedding=True)
    except BaseException:
        stop_sims(started)
        raise
    yield started
    stop_sims(started)


@pytest.fixture
def ms(sims):
    for s in sims:
        s.resume()
        s.reset_faults()
    fleet = fleet_of({"8": ("completion", [s.port for s in sims[:3]]), "7": ("embedding", [s.port for s in sims[3:]])})
    registry = CollectorRegistry()
    server = ModelServer(fleet, metrics_registry=registry)
    server.registry = registry  # for the metrics test
    yield server
    for s in sims:
        s.resume()
    server.close(timeout_s=2)


def _preferred(ms: ModelServer) -> str:
    ms.warmup()
    stats = ms.stats()["8"]
    return min(stats, key=lambda n: stats[n].latency_s)  # where `fastest` sends the next request


def test_chat_returns_a_chat_completion_and_the_original_call_shape_returns_text(ms) -> None:
    reply = ms.chat("8", MESSAGES, max_tokens=6, temperature=0.0)
    assert isinstance(reply, ChatCompletion) and reply.usage.completion_tokens == 6
    text = ms.get_completion_or_embedding("8", MESSAGES, temperature=0.0, max_tokens=6)
    assert text == reply.choices[0].message.content and text
    assert ms.get_completion_or_embedding(8, MESSAGES, max_tokens=6) == text  # int sizes as in the original


def test_a_400_is_rejected_on_the_first_attempt_and_blames_no_replica(ms, sims) -> None:
    with pytest.raises(RequestRejectedError) as info:
        ms.chat("8", MESSAGES, max_tokens=-1)
    err = info.value
    assert err.status == 400 and "max_tokens" in str(err) and isinstance(err.body, dict)
    assert isinstance(err, ClientError) and isinstance(err, ModelServerError)
    stats = ms.stats()["8"]
    assert sum(s.attempts for s in stats.values()) == 1
    assert all(s.failures == 0 and s.breaker is BreakerState.CLOSED for s in stats.values())
    assert stats[err.replica].rejected == 1


def test_a_404_is_rejected_too_and_an_unknown_model_name_is_not_an_error(sims) -> None:
    fleet = fleet_of({"8": ("completion", [sims[0].port])})
    wrong = fleet.model_copy(
        update={"servers": tuple(s.model_copy(update={"served_model_name": "nope"}) for s in fleet.servers)}
    )
    with ModelServer(wrong) as ms:
        assert ms.chat("8", MESSAGES, max_tokens=2).model == "nope"  # SGLang accepts any name and echoes it
        sims[0].set_faults(error_rate=1.0, error_status=404)
        try:
            with pytest.raises(RequestRejectedError) as info:
                ms.chat("8", MESSAGES, max_tokens=2)
        finally:
            sims[0].reset_faults()
    assert info.value.status == 404 and ms.stats()["8"]["8-0"].failures == 0


def test_stream_fails_over_invisibly_before_the_first_chunk(ms, sims) -> None:
    expected = ms.get_completion_or_embedding("8", MESSAGES, max_tokens=12)
    first = _preferred(ms)
    sims[int(first[-1])].set_faults(error_rate=1.0)
    chunks = list(ms.stream_chat("8", MESSAGES, max_tokens=12))
    assert len(chunks) > 1 and "".join(chunks) == expected
    assert ms.stats()["8"][first].failures == 1


def test_stream_fails_over_from_a_hung_replica(ms, sims) -> None:
    expected = ms.get_completion_or_embedding("8", MESSAGES, max_tokens=12)
    first = _preferred(ms)
    sims[int(first[-1])].suspend()
    assert "".join(ms.stream_chat("8", MESSAGES, max_tokens=12)) == expected
    assert "timeout" in (ms.stats()["8"][first].last_error or "")


def test_a_stream_every_replica_breaks_ends_after_max_resumes_with_the_text_so_far(ms, sims) -> None:
    expected = ms.get_completion_or_embedding("8", MESSAGES, max_tokens=12)
    for s in sims[:3]:
        s.set_faults(drop_stream_rate=1.0)
    received: list[str] = []
    with pytest.raises(StreamInterruptedError) as info:
        for chunk in ms.stream_chat("8", MESSAGES, max_tokens=12):
            received.append(chunk)
    err = info.value
    assert err.text == "".join(received) and err.text
    assert expected.startswith(err.text) and err.text != expected  # every resume continued the same answer
    assert err.resumes == ms.policy.max_resumes == 2 and "max_resumes = 2" in err.why_not_resumed
    assert sum(s.failures for s in ms.stats()["8"].values()) == 1 + 2  # the break, then one per resume: no storm


def test_a_stream_the_caller_abandons_frees_its_replica(ms) -> None:
    stream = ms.stream_chat("8", MESSAGES, max_tokens=50)
    assert next(stream)
    stream.close()
    assert all(s.in_flight == 0 for s in ms.stats()["8"].values())


def test_embeddings_one_or_many_and_failover(ms, sims) -> None:
    vector = ms.get_completion_or_embedding("7", "hello", get_embedding=True)
    assert isinstance(vector, list) and len(vector) == 256 and all(isinstance(x, float) for x in vector)
    batch = ms.embed("7", ["hello", "world"])
    assert len(batch) == 2 and batch[0] == pytest.approx(vector)
    sims[3].set_faults(malformed_rate=1.0)
    sims[4].set_faults(error_rate=0.5)
    for _ in range(10):
        assert ms.embed("7", "hello") == pytest.approx(vector)


def test_unknown_group_and_wrong_kind(ms) -> None:
    with pytest.raises(UnknownGroupError) as info:
        ms.chat("70", MESSAGES)
    assert "'8'" in str(info.value) and "'7'" in str(info.value) and isinstance(info.value, KeyError)
    with pytest.raises(RequestRejectedError, match="embed"):
        ms.chat("7", MESSAGES)
    with pytest.raises(TypeError):
        ms.chat("8", MESSAGES, stream=True)
    with pytest.raises(UnknownGroupError):
        ms.stream_chat("70", MESSAGES)  # at the call, before any iteration


def test_one_client_shared_by_64_threads(ms) -> None:
    def one(i: int) -> str:
        return ms.get_completion_or_embedding("8", MESSAGES, max_tokens=4)

    with ThreadPoolExecutor(64) as pool:
        replies = list(pool.map(one, range(256), timeout=60))
    assert len(replies) == 256 and all(replies)
    stats = ms.stats()["8"]
    assert sum(s.successes for s in stats.values()) == 256
    assert all(s.in_flight == 0 for s in stats.values())


def test_prometheus_metrics_count_requests_failures_and_failovers(ms, sims) -> None:
    first = _preferred(ms)
    sims[int(first[-1])].set_faults(error_rate=1.0)
    ms.chat("8", MESSAGES, max_tokens=2)
    reg = ms.registry
    labels = {"group": "8", "replica": first}
    assert reg.get_sample_value("model_server_client_requests_total", labels) == 1
    assert reg.get_sample_value("model_server_client_failures_total", dict(labels, kind="server")) == 1
    assert reg.get_sample_value("model_server_client_failovers_total", labels) == 1
    total = sum(
        reg.get_sample_value("model_server_client_latency_seconds_count", {"group": "8", "replica": f"8-{i}"}) or 0
        for i in range(3)
    )
    assert total == 1
    # read from the replicas at the scrape: the breaker's state and the latency routing compares
    stats = ms.stats()["8"]
    for name, snap in stats.items():
        states = {
            state.value: reg.get_sample_value(
                "model_server_client_breaker_state", {"group": "8", "replica": name, "state": state.value}
            )
            for state in BreakerState
        }
        assert states == {state.value: float(state is snap.breaker) for state in BreakerState}
        smoothed = reg.get_sample_value("model_server_client_smoothed_latency_seconds", {"group": "8", "replica": name})
        assert smoothed == snap.latency_s


def test_a_replica_back_from_the_dead_is_used_again(sims) -> None:
    for s in sims:  # this test uses the shared replicas without the `ms` fixture, which resets them
        s.resume()
        s.reset_faults()
    fleet = fleet_of({"8": ("completion", [sims[0].port])}, breaker_failures=1, breaker_cooldown_s=0.3)
    sims[0].set_faults(error_rate=1.0)
    with ModelServer(fleet) as ms:
        with pytest.raises(GroupUnavailableError):
            ms.chat("8", MESSAGES, max_tokens=2)
        assert ms.stats()["8"]["8-0"].breaker is BreakerState.OPEN
        sims[0].reset_faults()
        assert ms.chat("8", MESSAGES, max_tokens=2).choices[0].message.content  # a trial or a probe finds it
        assert ms.stats()["8"]["8-0"].breaker is BreakerState.CLOSED
