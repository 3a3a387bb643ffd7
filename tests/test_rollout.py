"""Rolling restarts of a group: the pure decisions (fake clock), then POST /groups/{group}/rollout on real processes.

The real-process tests share one pipeline of three simulated engines (chat-1..3
of configs/local.toml, group "8"; the table also has group "7", not run here)
with the control API on a free port; each test leaves every server READY. The
last test starts a pipeline of its own, to stop it in the middle of a rollout.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from _pipeline_runs import Run, all_ready, free_port, local_copy, wait_gone
from _waiting import wait_for

from model_server.config import LaunchPolicy
from model_server.launcher import rollout as ro

KEY = "control-key-for-the-rollout-tests-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAMES = ["chat-1", "chat-2", "chat-3"]
R, D, RS, ST = "READY", "DRAINING", "RESTARTING", "STARTING"


# ---- pure ---------------------------------------------------------------------------------------------


def fresh(servers: tuple[str, ...] = ("a", "b", "c"), bound_s: float = 100.0) -> ro.Rollout:
    return ro.begin("8-1", "8", servers, bound_s, now=0.0, wall_now=1000.0)


def test_a_rollout_restarts_one_server_at_a_time_and_moves_on_only_once_it_is_ready_with_a_new_pid() -> None:
    r = fresh()
    r, action = ro.advance(r, ro.Seen(R, 10), 1.0)
    assert action == ro.AskRestart("a") and r.phase == "restarting" and r.old_pid == 10
    for seen in (ro.Seen(R, 10), ro.Seen(D, 10), ro.Seen(RS, None), ro.Seen(ST, 11)):  # not back yet
        r, action = ro.advance(r, seen, 2.0)
        assert isinstance(action, ro.KeepWatching) and r.current == "a"
    r, action = ro.advance(r, ro.Seen(R, 11), 4.5)
    assert isinstance(action, ro.KeepWatching) and r.done == ("a",) and r.current == "b" and r.phase == "waiting"
    assert r.restarted == (ro.Restarted("a", 10, 11, 3.5),)
    r, action = ro.advance(r, ro.Seen(R, 20), 4.6)
    assert action == ro.AskRestart("b") and r.left == ("c",)
    r, _ = ro.advance(r, ro.Seen(R, 21), 6.0)
    r, action = ro.advance(r, ro.Seen(R, 30), 6.1)
    assert action == ro.AskRestart("c") and r.left == ()
    r, action = ro.advance(r, ro.Seen(R, 31), 9.0)
    assert isinstance(action, ro.Finished) and r.state is ro.RolloutState.DONE and r.current is None
    assert r.as_json(100.0) | {"started": 0} == {
        "id": "8-1", "group": "8", "state": "done", "servers": ["a", "b", "c"], "done": ["a", "b", "c"],
        "current": None, "phase": None, "left": [], "why": "", "started": 0, "elapsed_s": 9.0,
        "bound_per_server_s": 100.0,
        "restarted": [
            {"server": "a", "old_pid": 10, "new_pid": 11, "took_s": 3.5},
            {"server": "b", "old_pid": 20, "new_pid": 21, "took_s": 1.4},
            {"server": "c", "old_pid": 30, "new_pid": 31, "took_s": 2.9},
        ],
    }  # fmt: skip
    assert ro.advance(r, ro.Seen(R, 31), 10.0) == (r, ro.FINISHED)  # an ended rollout stays ended


def test_the_next_server_is_not_touched_until_it_is_ready() -> None:
    r, _ = ro.advance(fresh(("a", "b")), ro.Seen(R, 1), 0.0)
    r, _ = ro.advance(r, ro.Seen(R, 2), 1.0)  # a is back
    for t in (1.1, 5.0, 50.0):
        r, action = ro.advance(r, ro.Seen(ST, 7), t)  # b restarted on its own (a crash): wait
        assert isinstance(action, ro.KeepWatching) and r.phase == "waiting"
    r, action = ro.advance(r, ro.Seen(R, 7), 60.0)
    assert action == ro.AskRestart("b")


@pytest.mark.parametrize(
    ("seen", "says"),
    [
        (ro.Seen("FAILED", None), "server a: it ended FAILED instead of READY again"),
        (ro.Seen("STOPPED", None), "server a: it ended STOPPED instead of READY again"),
        (ro.Seen(R, 10), "server a: it was undrained (READY with the same pid 10) before its restart"),
    ],
)
def test_a_rollout_stops_when_its_server_ends_failed_stopped_or_undrained(seen: ro.Seen, says: str) -> None:
    r, _ = ro.advance(fresh(), ro.Seen(R, 10), 0.0)
    r, _ = ro.advance(r, ro.Seen(D, 10), 1.0)
    r, action = ro.advance(r, seen, 2.0)
    assert isinstance(action, ro.Finished) and r.state is ro.RolloutState.FAILED
    assert r.why.startswith(says) and "restarted: none; not restarted: b, c" in r.why
    assert r.current == "a" and r.left == ("b", "c") and r.ended_s == 2.0


def test_a_rollout_gives_up_on_a_server_not_back_in_time_and_on_one_that_never_becomes_ready() -> None:
    r, _ = ro.advance(fresh(bound_s=10.0), ro.Seen(R, 10), 0.0)
    r, action = ro.advance(r, ro.Seen(ST, 11), 10.0)
    assert isinstance(action, ro.KeepWatching)
    r, action = ro.advance(r, ro.Seen(ST, 11), 10.1)
    assert r.state is ro.RolloutState.FAILED and "not READY again within 10 s" in r.why and "it is STARTING" in r.why
    waiting = fresh(bound_s=10.0)
    waiting, action = ro.advance(waiting, ro.Seen("WAITING_GPU", None), 10.5)
    assert waiting.state is ro.RolloutState.FAILED and "was not READY within 10 s of its turn" in waiting.why
    gone, _ = ro.advance(fresh(), ro.Seen("FAILED", None), 0.0)
    assert gone.state is ro.RolloutState.FAILED and "it is FAILED, so it cannot be restarted" in gone.why


def test_refused_and_cancelled_rollouts_end_with_why_and_an_ended_one_stays_as_it_was() -> None:
    r, _ = ro.advance(fresh(), ro.Seen(R, 10), 0.0)
    failed = ro.refused(r, "it is DRAINING", 1.0)
    assert failed.state is ro.RolloutState.FAILED and "its restart was refused: it is DRAINING" in failed.why
    cancelled = ro.cancel(r, "the pipeline is stopping", 2.0)
    assert cancelled.state is ro.RolloutState.CANCELLED and cancelled.why == "the pipeline is stopping"
    assert ro.cancel(failed, "later", 3.0) is failed and ro.refused(cancelled, "x", 3.0) is cancelled
    with pytest.raises(ValueError):
        ro.begin("x", "8", (), 1.0, 0.0, 0.0)


def test_after_command_judges_a_drain_then_stop_and_a_restart() -> None:
    assert ro.after_command("stop", ro.Seen("STOPPED", None), 5, True) == (True, "")
    assert ro.after_command("stop", ro.Seen(D, 5), 5, True) is None
    assert ro.after_command("stop", ro.Seen("FAILED", None), 5, True)[0] is False
    assert "undrained" in ro.after_command("stop", ro.Seen(R, 5), 5, True)[1]
    assert ro.after_command("stop", ro.Seen(R, 5), 5, False) is None  # the command has not arrived yet
    assert ro.after_command("restart", ro.Seen(R, 6), 5, True) == (True, "")
    assert ro.after_command("restart", ro.Seen(R, None), 5, True) is None
    assert ro.after_command("restart", ro.Seen(ST, 6), 5, True) is None


@pytest.mark.parametrize(
    ("group", "states", "running", "closed", "status", "says"),
    [
        ("9", {}, None, False, 404, "no server of group '9' runs on this host"),
        ("8", {"a": R, "b": ST}, None, False, 409, "every server of it here must be READY first, and b is STARTING"),
        ("8", {"a": R, "b": "FAILED"}, None, False, 409, "b is FAILED. Wait until it is READY, start it"),
        ("8", {"a": R, "b": R}, "running", False, 409, "a rollout of group '8' is already running (id 8-1, on a)"),
        ("8", {"a": R, "b": R}, None, True, 409, "the pipeline is stopping"),
    ],
)
def test_rollout_refusals_name_the_group_and_the_fix(group, states, running, closed, status, says) -> None:
    groups = {"8": ["a", "b"], "7": ["e"]}
    previous = fresh(("a", "b")) if running else None
    refusal = ro.rollout_refusal(group, groups, states, previous, closed)
    assert refusal is not None and refusal[0] == status and says in refusal[1], refusal
    if status == 404:
        assert "This host's groups: 8 (a, b); 7 (e)" in refusal[1]


def test_no_refusal_for_a_ready_group_even_after_an_ended_rollout() -> None:
    done = ro.cancel(fresh(("a", "b")), "stopped", 1.0)
    assert ro.rollout_refusal("8", {"8": ["a", "b"]}, {"a": R, "b": R}, done) is None


def test_the_bound_per_server_covers_drain_stop_start_and_a_margin() -> None:
    policy = LaunchPolicy(drain_timeout_s=20, stop_grace_s=5, startup_timeout_s=60)
    assert ro.per_server_bound_s(policy) == 20 + 5 + 60 + ro.MARGIN_S


# ---- real processes -----------------------------------------------------------------------------------


class Pipeline:
    def __init__(self, run: Run, port: int) -> None:
        self.run = run
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def status(self) -> dict:
        return self.api.get("/status").json()

    def servers(self) -> dict[str, dict]:
        return {s["name"]: s for s in self.status()["servers"]}

    def rollout(self, group: str = "8") -> dict | None:
        return self.status()["rollouts"].get(group)

    def ready(self, names: list[str] = NAMES, timeout_s: float = 45.0) -> dict[str, dict]:
        return self.run.wait(all_ready(names), f"{', '.join(names)} READY", timeout_s)

    def events(self) -> list[dict]:
        path = self.run.status_file.parent / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]


def start_pipeline(tmp_path: Path, names: list[str]) -> Pipeline:
    port = free_port()
    launch = {"control_port": str(port), "control_key_env": '"MS_TEST_CONTROL_KEY"', "drain_timeout_s": "20"}
    run = Run(local_copy(tmp_path, launch=launch), tmp_path, tuple(a for n in names for a in ("--only", n)),
              env={"MS_TEST_CONTROL_KEY": KEY})  # fmt: skip
    return Pipeline(run, port)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    p = start_pipeline(tmp_path_factory.mktemp("rollout"), NAMES)
    try:
        p.ready(timeout_s=60)
        yield p
        assert p.run.stop() == 0, p.run.output()
        assert "Traceback" not in p.run.output(tail=False) and KEY not in p.run.output(tail=False)
    finally:
        p.run.cleanup()


class Recorder:
    """Polls GET /status as fast as it answers, in a thread; keeps every sample of the group's states."""

    def __init__(self, p: Pipeline) -> None:
        self.p, self.samples, self.errors = p, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                servers = self.p.servers()
            except httpx.HTTPError as err:  # recorded, and the test fails on it
                self.errors.append(repr(err))
                self._stop.wait(0.1)
                continue
            self.samples.append({n: (s["state"], s["pid"]) for n, s in servers.items() if n in NAMES})
            self._stop.wait(0.02)

    def __enter__(self) -> Recorder:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the recorder's thread did not end within 10 s"


@pytest.mark.slow
@pytest.mark.timeout(145)  # 1.5 x its waits (95 s): a wait's own message, not the timeout's, tells what failed
def test_a_rollout_restarts_each_replica_once_one_at_a_time(pipeline: Pipeline) -> None:
    before = {n: s["pid"] for n, s in pipeline.servers().items()}
    with Recorder(pipeline) as recorder:
        answer = pipeline.api.post("/groups/8/rollout", headers=AUTH)
        assert answer.status_code == 202, answer.text
        plan = answer.json()
        assert plan["group"] == "8" and plan["servers"] == NAMES and plan["state"] == "running"
        assert plan["current"] == "chat-1" and plan["left"] == ["chat-2", "chat-3"] and plan["done"] == []
        again = pipeline.api.post("/groups/8/rollout", headers=AUTH)
        assert again.status_code == 409 and f"already running (id {plan['id']}" in again.json()["error"]
        final = wait_for(
            lambda: (r := pipeline.rollout()) is not None and r["state"] != "running" and r, 75,
            lambda: f"the rollout to end: {pipeline.rollout()}",
        )  # fmt: skip
    assert final["state"] == "done" and final["id"] == plan["id"], final
    assert final["done"] == NAMES and final["current"] is None and final["left"] == [] and final["why"] == ""
    restarted = {r["server"]: (r["old_pid"], r["new_pid"]) for r in final["restarted"]}
    servers = pipeline.servers()
    for name in NAMES:
        assert restarted[name][0] == before[name] and restarted[name][1] == servers[name]["pid"] != before[name]
        assert servers[name]["state"] == "READY" and servers[name]["restarts"] == 0
    wait_gone(list(before.values()))
    # at no time two of the group out of service: every sample of GET /status, polled throughout
    assert not recorder.errors and len(recorder.samples) > 20, (recorder.errors, len(recorder.samples))
    for sample in recorder.samples:
        assert sum(state != "READY" for state, _pid in sample.values()) <= 1, sample
    # ... and the events file: each one drained once, in table order, each after the one before was READY again
    events = [e for e in pipeline.events() if e["server"] in NAMES and e["time"] >= plan["started"] - 1]
    drains = [e["server"] for e in events if e["to"] == "DRAINING"]
    assert drains == NAMES, events
    out: set[str] = set()
    for e in events:
        if e["to"] == "READY":
            out.discard(e["server"])
        else:
            out.add(e["server"])
        assert len(out) <= 1, (e, events)
    log = pipeline.run.output(tail=False)
    assert f"rollout {plan['id']} of group 8 done: 3 server(s) restarted" in log


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_rollout_refusals_are_clear_and_touch_nothing(pipeline: Pipeline) -> None:
    before = {n: s["pid"] for n, s in pipeline.servers().items()}
    cases = [
        ("/groups/8/rollout", {}, None, 401, "Authorization: Bearer"),
        ("/groups/8/rollout", {"Authorization": "Bearer wrong"}, None, 401, "not this pipeline's"),
        ("/groups/nope/rollout", AUTH, None, 404, "no server of group 'nope' runs on this host"),
        ("/groups/7/rollout", AUTH, None, 404, "This host's groups: 8 (chat-1, chat-2, chat-3)"),
        ("/groups/8/rollout", AUTH, b'{"fast": true}', 422, "Fields this route takes: none"),
    ]
    for path, headers, body, status, says in cases:
        answer = pipeline.api.post(path, headers=headers, content=body)
        assert answer.status_code == status, (path, answer.text)
        assert says in answer.json()["error"], (path, answer.text)
        assert KEY not in answer.text
    wrong_verb = pipeline.api.get("/groups/8/rollout")
    assert wrong_verb.status_code == 405 and "POST /groups/{group}/rollout" in wrong_verb.json()["error"]
    assert pipeline.servers().keys() == set(NAMES) and {n: s["pid"] for n, s in pipeline.servers().items()} == before
    # a server of the group not READY: refused, naming it; nothing restarted
    assert pipeline.api.post("/servers/chat-3/stop", headers=AUTH).status_code == 202
    wait_for(lambda: pipeline.servers()["chat-3"]["state"] == "STOPPED", 20, "chat-3 STOPPED")
    refused = pipeline.api.post("/groups/8/rollout", headers=AUTH)
    assert refused.status_code == 409, refused.text
    assert "chat-3 is STOPPED" in refused.json()["error"] and "POST /servers/<name>/start" in refused.json()["error"]
    assert pipeline.api.post("/servers/chat-3/start", headers=AUTH).status_code == 202
    servers = pipeline.ready()
    assert servers["chat-1"]["pid"] == before["chat-1"] and servers["chat-2"]["pid"] == before["chat-2"]


@pytest.mark.slow
@pytest.mark.timeout(145)  # 1.5 x its waits (95 s)
def test_a_rollout_stops_with_why_when_its_server_is_stopped_under_it(pipeline: Pipeline) -> None:
    before = {n: s["pid"] for n, s in pipeline.servers().items()}
    assert pipeline.api.post("/groups/8/rollout", headers=AUTH).status_code == 202
    wait_for(
        lambda: pipeline.servers()["chat-1"]["state"] != "READY", 20, lambda: f"chat-1 restarting: {pipeline.rollout()}"
    )
    assert pipeline.api.post("/servers/chat-1/stop", headers=AUTH).status_code == 202  # an operator's stop
    final = wait_for(lambda: (r := pipeline.rollout())["state"] != "running" and r, 30, "the rollout to end")
    assert final["state"] == "failed" and final["current"] == "chat-1" and final["done"] == [], final
    assert final["why"].startswith("server chat-1: it ended STOPPED instead of READY again"), final["why"]
    assert "not restarted: chat-2, chat-3" in final["why"]
    servers = pipeline.servers()
    assert servers["chat-2"]["pid"] == before["chat-2"] and servers["chat-3"]["pid"] == before["chat-3"]
    assert f"rollout {final['id']} of group 8 failed: server chat-1" in pipeline.run.output(tail=False)
    assert pipeline.api.post("/servers/chat-1/start", headers=AUTH).status_code == 202
    pipeline.ready()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_the_pipeline_stopping_cancels_its_rollout(tmp_path: Path) -> None:
    p = start_pipeline(tmp_path, ["chat-1", "chat-2"])
    try:
        servers = p.ready(["chat-1", "chat-2"], 60)
        assert p.api.post("/groups/8/rollout", headers=AUTH).status_code == 202
        wait_for(lambda: p.servers()["chat-1"]["state"] != "READY", 20, "chat-1 restarting")
        code = p.run.stop(signal.SIGTERM, timeout_s=40)
        assert code in (0, 1), p.run.output()  # 1 when chat-1 was not READY again at the stop (the usual case)
        log = p.run.output(tail=False)
        assert "rollout of group 8 cancelled: the pipeline is stopping" in log and "Traceback" not in log
        assert "rollout 8-1: restarting server chat-1 (1/2)" in log, log[-3000:]  # the line the next one would follow
        assert "rollout 8-1: restarting server chat-2" not in log
        wait_gone([s["pid"] for s in servers.values()] + list(p.run.seen))
    finally:
        p.run.cleanup()
