"""The run-state file and the client's public surface."""

from __future__ import annotations

import json
import os

import model_server.client as client
from model_server.client.retry import Attempt
from model_server.client.runstate import mark_not_running, update_run_state
from model_server.errors import (
    ClientError,
    GroupUnavailableError,
    RequestRejectedError,
    StreamInterruptedError,
    UnknownGroupError,
)


def test_is_running_is_cleared_keeping_every_other_key(tmp_path) -> None:
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"is_running": True, "epoch": 3, "nested": {"a": [1, 2]}}))
    assert mark_not_running(state)
    assert json.loads(state.read_text()) == {"is_running": False, "epoch": 3, "nested": {"a": [1, 2]}}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left behind


def test_a_missing_file_is_created_and_a_broken_one_left_alone(tmp_path) -> None:
    fresh = tmp_path / "deep" / "state.json"
    assert mark_not_running(fresh) and json.loads(fresh.read_text()) == {"is_running": False}
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert not mark_not_running(broken) and broken.read_text() == "{not json"
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    assert not update_run_state(listed, is_running=False) and listed.read_text() == "[1, 2]"


def test_an_unwritable_directory_is_reported_not_raised(tmp_path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):  # running as root: permissions do not bind
            return
        assert not mark_not_running(locked / "state.json")
    finally:
        os.chmod(locked, 0o700)


def test_exception_tree_and_messages() -> None:
    for cls in (UnknownGroupError, RequestRejectedError, GroupUnavailableError, StreamInterruptedError):
        assert issubclass(cls, ClientError)
    err = GroupUnavailableError(
        "8", [Attempt("8-0", "timeout: slow", 2.0), Attempt("8-1", "HTTP 503: busy", 0.01)], "budget spent"
    )
    text = str(err)
    assert "#1 8-0: timeout: slow after 2.00s" in text and "#2 8-1: HTTP 503: busy" in text
    assert err.attempts[1].replica == "8-1" and err.attempts[0].elapsed_s == 2.0
    assert str(UnknownGroupError("70", ["8", "7"])).startswith("the fleet table has no group '70'")
    assert StreamInterruptedError("8", "8-0", "partial", "reset").text == "partial"


def test_client_all_is_pinned() -> None:
    assert sorted(client.__all__) == sorted(
        [
            "AsyncChatStream",
            "AsyncModelServer",
            "ChatStream",
            "ClientError",
            "GroupUnavailableError",
            "InvalidRequestError",
            "ModelServer",
            "RequestRejectedError",
            "StreamInterruptedError",
            "UnexpectedAnswerError",
            "UnknownGroupError",
        ]
    )
    for name in client.__all__:
        assert getattr(client, name) is not None
