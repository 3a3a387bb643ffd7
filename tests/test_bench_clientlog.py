"""What the client saw during a bench run, read from its log (model_server/bench/clientlog.py): pure parts
and the logging plumbing, in process. The CLI end of it is in test_bench_cli.py."""

from __future__ import annotations

import io
import logging

import pytest

from model_server.bench.clientlog import (
    ClientEvent,
    ClientEventLog,
    EventKind,
    classify,
    default_log_path,
    divert_client_log,
    fault_effects,
    live_status,
)
from model_server.bench.report import build_result, client_seen_line, client_totals_line, result_lines
from model_server.bench.runner import RunOutcome
from model_server.bench.stats import RequestRecord

SERVERS = ["chat-1", "chat-10", "chat-2", "8@127.0.0.1:18056"]
FAILOVER = "failover in group '%s': attempt %d/%d on %s failed (%s); next replica in %.0f ms"
BREAKER = "breaker of %s (group '%s'): %s -> %s%s"


def _classify(template: str, *args, level: int = logging.WARNING) -> ClientEvent | None:
    return classify(template, template % args, level, SERVERS)


# ---- classify (pure) -----------------------------------------------------------------


def test_a_failover_names_the_replica_it_left():
    event = _classify(FAILOVER, "8", 2, 20, "chat-10", "connection error: chat-1 is down", 35)
    # the first name, and not chat-1 inside chat-10
    assert (event.kind, event.replica) == (EventKind.FAILOVER, "chat-10")


def test_a_breaker_change_carries_both_states_at_any_level():
    event = _classify(BREAKER, "chat-2", "8", "closed", "open", " after HTTP 500")
    assert (event.kind, event.replica, event.old, event.new) == (EventKind.BREAKER, "chat-2", "closed", "open")
    trial = _classify(
        "breaker of %s (group '%s'): %s -> %s (trial request)",
        "8@127.0.0.1:18056",
        "8",
        "open",
        "half_open",
        level=logging.INFO,
    )
    assert (trial.kind, trial.replica, trial.new) == (EventKind.BREAKER, "8@127.0.0.1:18056", "half_open")


RESUMING = (
    "resuming a stream of group '%s': %s broke after %d token(s) (%s); continuing on another replica (resume %d/%d)"
)
RESUMED = "stream of group '%s' resumed on %s after %s broke (%d token(s) carried over)"


def test_resumes_other_warnings_and_quiet_info_lines():
    broke = _classify(RESUMING, "8", "chat-1", 12, "connection error", 1, 2)  # the attempt: a warning about chat-1
    assert (broke.kind, broke.replica) == (EventKind.OTHER, "chat-1")
    assert _classify(RESUMED, "8", "chat-2", "chat-1", 12).kind is EventKind.RESUME  # counted once, when it went on
    other = _classify("group '%s': degraded replica(s) %s; re-probing the group", "8", "chat-2")
    assert (other.kind, other.replica) == (EventKind.OTHER, "chat-2")
    assert _classify("no replica of group '%s' answered a probe", "8").replica is None
    assert _classify("group '%s' built: %d replicas", "8", 3, level=logging.INFO) is None


def test_a_name_inside_another_word_is_not_a_replica():
    assert _classify("failover on %s", "xchat-1y").replica is None
    assert _classify("failover on %s.", "chat-1").replica == "chat-1"  # end of a sentence


# ---- the handler, the live line and the totals -----------------------------------------


def test_the_event_log_counts_client_records_and_ignores_the_bench_own():
    log = ClientEventLog(SERVERS)
    with log.attached():
        client = logging.getLogger("model_server.client")
        client.warning(FAILOVER, "8", 1, 20, "chat-1", "timeout", 20)
        client.warning(FAILOVER, "8", 2, 20, "chat-1", "timeout", 40)
        client.warning(FAILOVER, "8", 1, 20, "chat-2", "HTTP 500", 10)
        client.warning(BREAKER, "chat-1", "8", "closed", "open", "")
        logging.getLogger("model_server.bench.injector").warning("fault 1s kill chat-1 at 1.00s: failover soon")
        logging.getLogger("model_server.cli.bench").warning("breaker of chat-2: closed -> open")
    logging.getLogger("model_server.client").warning(FAILOVER, "8", 1, 20, "chat-2", "after detach", 10)
    assert [e.kind for e in log.events] == [EventKind.FAILOVER] * 3 + [EventKind.BREAKER]
    assert live_status(log) == "failovers 3 (chat-1 2, chat-2 1)  breaker chat-1 open"
    assert log.totals() == {
        "failovers": {"chat-1": 2, "chat-2": 1},
        "breaker_changes": {"chat-1": 1},
        "breaker_state_at_end": {"chat-1": "open"},
        "resumes": 0,
        "other_warnings": 0,
    }
    assert live_status(None) == "" and live_status(ClientEventLog(SERVERS)) == ""


# ---- the terminal and the log file -----------------------------------------------------


@pytest.fixture
def terminal():
    """A root handler standing for the terminal, as `model-server` configures it."""
    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(old_level)


def _log_a_run() -> None:
    logging.getLogger("model_server.client").warning(FAILOVER, "8", 1, 20, "chat-1", "timeout", 20)
    logging.getLogger("model_server.bench.injector").info("fault 1s kill chat-1 at 1.00s: signal 9")
    logging.getLogger("httpx").warning("an unrelated library")


def test_client_lines_go_to_the_file_not_the_terminal(tmp_path, terminal):
    path = tmp_path / "logs" / "bench.log"
    with divert_client_log(path) as diverted:
        _log_a_run()
    shown = terminal.getvalue()
    assert "failover" not in shown and "WARNING model_server.client" not in shown
    assert "fault 1s kill chat-1" in shown and "an unrelated library" in shown
    text = path.read_text()
    assert "WARNING model_server.client: failover in group '8'" in text and "fault 1s kill chat-1" in text
    assert diverted.lines == 2 and diverted.error is None
    logging.getLogger("model_server.client").warning("after the run")
    assert "after the run" in terminal.getvalue() and "after the run" not in path.read_text()  # undone on exit


def test_verbose_keeps_them_on_the_terminal_too(tmp_path, terminal):
    with divert_client_log(tmp_path / "bench.log", keep_on_terminal=True):
        _log_a_run()
    assert "WARNING model_server.client: failover" in terminal.getvalue()
    assert "failover" in (tmp_path / "bench.log").read_text()


def test_a_quiet_run_leaves_no_file_and_an_unwritable_one_is_reported(tmp_path, terminal):
    with divert_client_log(tmp_path / "logs" / "bench.log") as quiet:
        logging.getLogger("httpx").warning("not ours")
    assert quiet.lines == 0 and not (tmp_path / "logs").exists()
    (tmp_path / "file").write_text("")
    with divert_client_log(tmp_path / "file" / "bench.log") as broken:
        _log_a_run()
    assert broken.error and broken.lines == 0
    assert "failover" not in terminal.getvalue()  # still off the terminal


def test_default_log_path_is_dated_in_the_log_dir(tmp_path):
    assert default_log_path(tmp_path, now=0).parent == tmp_path
    path = default_log_path("logs", now=0)
    assert path.name.startswith("bench-") and path.suffix == ".log"


# ---- what each fault did (pure) ----------------------------------------------------------

START = 1000.0  # wall-clock time of the run's start


def _ev(t: float, kind: EventKind, replica: str | None, old: str | None = None, new: str | None = None) -> ClientEvent:
    return ClientEvent(START + t, kind, replica, old, new)


def _fault(at: float, action: str, server: str, undo: bool = False, ok: bool = True) -> dict:
    return {
        "at_s": at,
        "action": action,
        "server": server,
        "spec": f"{at:g}s {action} {server}",
        "undo": undo,
        "applied_s": at + 0.01,
        "ok": ok,
        "detail": "",
    }


def test_fault_effects_per_fault_window():
    faults = [
        _fault(10, "kill", "chat-1"),
        _fault(20, "stop", "chat-2"),
        _fault(23, "resume", "chat-2", undo=True),
        _fault(25, "kill", "chat-3", ok=False),
    ]
    events = [
        _ev(5, EventKind.FAILOVER, "chat-1"),  # before the fault: not its
        _ev(10.1, EventKind.FAILOVER, "chat-1"),
        _ev(10.3, EventKind.FAILOVER, "chat-1"),
        _ev(10.3, EventKind.BREAKER, "chat-1", "closed", "open"),
        _ev(20.3, EventKind.BREAKER, "chat-1", "open", "half_open"),
        # after the next fault, on another server: still chat-1's
        _ev(20.35, EventKind.BREAKER, "chat-1", "half_open", "closed"),
        _ev(21.0, EventKind.FAILOVER, "chat-2"),
        _ev(21.5, EventKind.RESUME, "chat-3"),
        _ev(24.0, EventKind.FAILOVER, "chat-2"),
        _ev(24.5, EventKind.BREAKER, "chat-2", "closed", "open"),
    ]
    failed = [10.2, 19.0, 21.0, 30.0]
    kill, stop, undo, not_applied = fault_effects(faults, events, failed, start_wall_s=START, end_s=30.0)
    assert undo is None and not_applied is None
    assert kill["seen"] and kill["failovers"] == 2 and kill["last_failover_after_s"] == pytest.approx(0.29)
    assert [(b["from"], b["to"]) for b in kill["breaker"]] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    assert kill["recovered_after_s"] == pytest.approx(10.34)
    assert (kill["failed_requests"], kill["resumes"]) == (2, 0)  # until the next fault on any server (20.01)
    assert kill["window_s"] == pytest.approx(20.0 - 0.01)  # no later fault on chat-1
    assert stop["failovers"] == 2 and stop["resumes"] == 1 and stop["failed_requests"] == 1  # 30.0 is past the end
    assert stop["recovered_after_s"] is None  # its breaker was still open at the end


def test_a_fault_the_client_did_not_see():
    (quiet,) = fault_effects(
        [_fault(1, "kill", "chat-1")], [_ev(2, EventKind.FAILOVER, "chat-2")], [], start_wall_s=START, end_s=5
    )
    assert not quiet["seen"] and quiet["recovered_after_s"] is None and quiet["failovers"] == 0
    assert "noticed nothing" in client_seen_line("chat-1", quiet)


def test_the_summary_lists_what_the_client_saw():
    outcome = RunOutcome(
        records=[RequestRecord(0, sent_s=0.0, done_s=11.0, ok=True, output_tokens=3)],
        faults=[],
        wall_s=30.0,
        start_wall_s=START,
    )
    log = ClientEventLog(SERVERS)
    log.events.extend(
        [
            _ev(10.1, EventKind.FAILOVER, "chat-1"),
            _ev(10.3, EventKind.BREAKER, "chat-1", "closed", "open"),
            _ev(20.4, EventKind.BREAKER, "chat-1", "half_open", "closed"),
        ]
    )
    log.failovers["chat-1"] = 1
    log.breaker_changes["chat-1"] = 2
    log.breaker_state["chat-1"] = "closed"

    class Applied:  # what the injector records
        def as_dict(self) -> dict:
            return _fault(10, "kill", "chat-1")

    outcome.faults = [Applied()]
    result = build_result(outcome, asked_rate=None, client_log=log)
    assert result["client"]["failovers"] == {"chat-1": 1} and result["faults"][0]["client"]["failovers"] == 1
    lines = result_lines(result)
    seen = lines[lines.index("fault 10s kill chat-1: applied at 10.01 s, ok ()") + 1]
    assert seen == (
        "  client saw: 1 failover off chat-1 (the last 0.09 s after); 0 resumed streams; 0 failed requests; "
        "breaker closed->open +0.29 s, half_open->closed +10.39 s; recovered after 10.39 s"
    )
    totals = "client: failovers chat-1 1; breaker changes chat-1 2; resumed streams 0"
    assert lines[-1] == client_totals_line(result["client"]) == totals
    assert "client" not in build_result(outcome, asked_rate=None)  # --url runs: no client
