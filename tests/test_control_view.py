"""The client's view of the control APIs, and how it steers routing and probe rounds (fake clock, no I/O)."""

from __future__ import annotations

import random

from model_server.client.control_view import ControlView
from model_server.client.replica_group import ProbeResult, ReplicaGroup
from model_server.client.retry import OutcomeKind
from model_server.common.control_status import Recorded, parse_control_status
from model_server.config import ClientPolicy, ServerKind, ServerSpec

HOSTS = {"a": "h1", "b": "h1", "c": "h2"}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def status(**states: str | tuple[str, int]) -> dict[str, Recorded]:
    """A ``GET /status`` answer as the listener passes it on (parsed by common/control_status.py)."""
    servers = []
    for name, value in states.items():
        state, pid = value if isinstance(value, tuple) else (value, 100)
        servers.append({"name": name, "state": state, "pid": pid, "restarts": 0})
    parsed, problem = parse_control_status({"servers": servers})
    assert problem == ""
    return parsed


def view(stale_after_s: float = 3.0) -> tuple[ControlView, Clock]:
    clock = Clock()
    return ControlView(HOSTS, stale_after_s, clock), clock


def test_a_replica_heard_not_ready_is_held_out_of_requests_and_probes() -> None:
    v, _clock = view()
    news = v.heard("h1", status(a="READY", b="DRAINING"))
    assert news.left == (("b", "DRAINING"),) and news.back == ()
    assert v.held_out(HOSTS) == {"b"} and v.not_ready(HOSTS) == {"b"}
    assert v.states() == {"a": "READY", "b": "DRAINING"}


def test_back_to_ready_waits_for_one_of_our_probes() -> None:
    v, _clock = view()
    v.heard("h1", status(a="READY", b="STARTING"))
    news = v.heard("h1", status(a="READY", b="READY"))
    assert news.back == ("b",)
    assert v.held_out(HOSTS) == {"b"} and v.not_ready(HOSTS) == frozenset()  # probed, not yet asked
    assert v.unprobed(HOSTS) == {"b"}
    v.probed("b")
    assert v.held_out(HOSTS) == frozenset() and v.unprobed(HOSTS) == frozenset()


def test_a_new_pid_while_ready_is_a_restart_between_two_reads() -> None:
    v, _clock = view()
    v.heard("h1", status(a=("READY", 10)))
    assert v.heard("h1", status(a=("READY", 10))).back == ()
    assert v.heard("h1", status(a=("READY", 11))).back == ("a",)
    assert v.held_out(HOSTS) == {"a"}


def test_an_unreachable_host_is_forgotten_at_once_and_only_that_host() -> None:
    v, _clock = view()
    v.heard("h1", status(a="DRAINING", b="READY"))
    v.heard("h2", status(c="FAILED"))
    assert v.lost("h1") is True
    assert v.held_out(HOSTS) == {"c"} and v.states() == {"c": "FAILED"}
    assert v.lost("h1") is False  # nothing left to forget


def test_an_answer_older_than_the_staleness_bound_counts_for_nothing() -> None:
    v, clock = view(stale_after_s=3.0)
    v.heard("h1", status(a="DRAINING"))
    clock.now = 3.0
    assert v.held_out(HOSTS) == {"a"}
    clock.now = 3.1
    assert v.held_out(HOSTS) == frozenset() and v.states() == {}


def test_a_host_speaks_only_for_its_own_replicas_of_the_table() -> None:
    v, _clock = view()
    v.heard("h2", status(a="FAILED", zzz="FAILED", c="READY"))  # a is h1's; zzz is not in the table
    assert v.states() == {"c": "READY"}


def test_a_damaged_answer_is_refused_whole_and_changes_nothing() -> None:
    """The listener hands the view only answers that parse; a damaged one is a failed read."""
    servers, problem = parse_control_status({"servers": [{"name": "a"}, {"state": "READY"}]})
    assert servers == {} and "has no name and state" in problem
    assert parse_control_status({"servers": "all fine"}) == (
        {},
        'its answer is not a control API status (no "servers" list)',
    )


# ---- the group: routing and probe rounds follow the view -------------------------------------------------


def spec(name: str) -> ServerSpec:
    return ServerSpec(name=name, group="g", kind=ServerKind.completion, host=HOSTS[name], port=9000, model="m",
                      gpus=[0])  # fmt: skip


def built_group(v: ControlView, clock: Clock) -> ReplicaGroup:
    group = ReplicaGroup("g", [spec(n) for n in HOSTS], ClientPolicy(), clock=clock, view=v)
    group.apply_probes([ProbeResult(spec(n), latency_s=0.1, output_tokens=1) for n in HOSTS])
    return group


def chosen(group: ReplicaGroup, n: int = 60) -> set[str]:
    rng, names = random.Random(1), set()
    for _ in range(n):
        lease = group.acquire(rng)
        assert lease is not None
        names.add(lease.spec.name)
        group.release(lease, None)
    return names


def test_requests_go_only_to_replicas_the_view_does_not_hold_out() -> None:
    v, clock = view()
    group = built_group(v, clock)
    assert chosen(group) == {"a", "b", "c"}
    v.heard("h1", status(a="READY", b="DRAINING"))
    assert chosen(group) == {"a", "c"}
    assert [s.name for s in group.probe_specs()] == ["a", "c"]
    v.heard("h1", status(a="RESTARTING", b="DRAINING"))
    v.heard("h2", status(c="STARTING"))
    assert group.acquire(random.Random(1)) is None  # every replica out: the plan probes, then backs off
    assert group.probe_specs() == ()
    assert group.note_round_without_probes() is False and "no replica is READY" in group.last_round_summary


def test_a_replica_back_to_ready_asks_for_a_re_probe_and_re_enters_once_it_answers() -> None:
    v, clock = view()
    group = built_group(v, clock)
    v.heard("h1", status(a="READY", b="STARTING"))
    clock.now = 1.0
    v.heard("h1", status(a="READY", b=("READY", 200)))
    assert chosen(group) == {"a", "c"} and group.wants_reprobe()
    lease = group.acquire(random.Random(1))
    assert lease is not None
    assert group.release(lease, OutcomeKind.OK, output_tokens=4) is True  # at once, not after reprobe_interval_s
    assert group.try_start_reprobe()
    lease = group.acquire(random.Random(1))
    assert lease is not None and group.release(lease, OutcomeKind.OK, output_tokens=4) is False  # one at a time
    group.end_reprobe()  # ... and its probe of b found nothing: b stays out, and no storm of rounds follows
    lease = group.acquire(random.Random(1))
    assert lease is not None and group.release(lease, OutcomeKind.OK, output_tokens=4) is False
    clock.now += ClientPolicy().reprobe_interval_s
    v.heard("h1", status(a="READY", b=("READY", 200)))  # the pipeline still says so (the view stays fresh)
    lease = group.acquire(random.Random(1))
    assert lease is not None and group.release(lease, OutcomeKind.OK, output_tokens=4) is True  # the paced retry
    group.apply_probes([ProbeResult(spec("b"), latency_s=0.1, output_tokens=1)])
    assert chosen(group) == {"a", "b", "c"} and not group.wants_reprobe()


def test_without_a_view_the_group_routes_on_its_own_probes() -> None:
    clock = Clock()
    group = ReplicaGroup("g", [spec(n) for n in HOSTS], ClientPolicy(), clock=clock)
    group.apply_probes([ProbeResult(spec(n), latency_s=0.1, output_tokens=1) for n in HOSTS])
    assert chosen(group) == {"a", "b", "c"} and len(group.probe_specs()) == 3


def test_a_view_with_nothing_held_out_answers_without_its_lock_and_holds_out_again_once_told() -> None:
    v, clock = view()
    v.heard("h1", status(a="READY", b="READY"))
    with v._lock:  # held elsewhere: a request in the usual case (all READY, all probed) does not wait for it
        assert v.held_out(HOSTS) == frozenset() and v.unprobed(HOSTS) == frozenset()
    v.heard("h2", status(c="DRAINING"))
    assert v.held_out(HOSTS) == {"c"} and v.not_ready(HOSTS) == {"c"}
    clock.now = 10.0  # its answer is stale: it counts for nothing, though the view is not quiet
    assert v.held_out(HOSTS) == frozenset()
    v.heard("h2", status(c="READY"))  # back: out until probed
    assert v.held_out(HOSTS) == {"c"} and v.unprobed(HOSTS) == {"c"}
    v.probed("c")
    with v._lock:
        assert v.held_out(HOSTS) == frozenset()
    assert v.hosts == ("h1", "h2")


def test_a_control_refresh_that_would_storm_the_control_apis_is_refused() -> None:
    import pytest

    from model_server.errors import ConfigError

    assert ClientPolicy(control_refresh_s=0).control_refresh_s == 0
    with pytest.raises(ValueError, match="at least 0.1 s, or 0 to stop listening"):
        ClientPolicy(control_refresh_s=0.001)
    assert issubclass(ConfigError, ValueError)
