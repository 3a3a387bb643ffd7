"""Secrets out of engine logs: the Redactor (pure), the log pump over a real pipe, 0600 log files."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model_server.launcher.engine_log import IDLE_FLUSH_S, LogPump, open_log
from model_server.launcher.redact import MASK, RedactingFilter, Redactor, Secret

KEY = "sk-'q\"7f3a-Do-Not-Leak"


def test_every_printed_form_of_a_secret_is_masked() -> None:
    r = Redactor([KEY, "hf_token_value"])
    lines = [
        f"server_args=ServerArgs(model_path='m', api_key={KEY!r}, port=1)",  # Python repr escapes the quote
        f"resolved {json.dumps({'api_key': KEY})}",  # JSON escapes the other
        f"Authorization: Bearer {KEY}",
        "HF_TOKEN=hf_token_value",
    ]
    for line in lines:
        out = r.redact(line)
        assert KEY not in out and repr(KEY)[1:-1] not in out and json.dumps(KEY)[1:-1] not in out, out
        assert "hf_token_value" not in out and MASK in out
        assert r.redact_bytes(line.encode()) == out.encode()


def test_a_quoted_api_key_is_masked_even_when_unknown() -> None:
    r = Redactor()
    assert r.redact("ServerArgs(api_key='other', admin_api_key=\"x\", api_key_env='K', port=3)") == (
        "ServerArgs(api_key='***', admin_api_key='***', api_key_env='K', port=3)"
    )
    assert r.redact('{"api_key": "v", "api-key": "w"}') == "{\"api_key\": '***', \"api-key\": '***'}"
    assert r.redact("api_key=None") == "api_key=None"


def test_secrets_never_show_in_reprs() -> None:
    secret = Secret(KEY)
    r = Redactor([secret])
    assert KEY not in repr(secret) and KEY not in str(secret) and KEY not in repr(r) and secret.value == KEY
    assert repr(r) == "Redactor(1 secret)"


def test_the_logging_filter_masks_messages_and_arguments(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test_redact.filter")
    filt = RedactingFilter(Redactor([KEY]))
    caplog.handler.addFilter(filt)
    try:
        logger.error("the engine said %s", f"api_key={KEY!r}")
    finally:
        caplog.handler.removeFilter(filt)
    assert KEY not in caplog.text and "api_key='***'" in caplog.text


@settings(max_examples=200, deadline=None)
@given(
    st.text(st.characters(blacklist_characters="*"), min_size=1, max_size=20),
    st.text(max_size=40),
    st.text(max_size=40),
)
def test_a_secret_never_survives_in_any_text(secret: str, before: str, after: str) -> None:
    out = Redactor([secret]).redact(before + secret + after)
    assert secret not in out and secret not in Redactor([secret]).redact_bytes(
        (before + secret + after).encode("utf-8", "surrogatepass")
    ).decode("utf-8", "surrogatepass")


# ---- the pump: a real pipe, a real thread ----------------------------------------------------------


def pump_through(tmp_path: Path, redactor: Redactor, writes: list[bytes], pause_s: float = 0.0) -> str:
    read_end, write_end = os.pipe()
    log_file = tmp_path / "logs" / "e.log"
    pump = LogPump(os.fdopen(read_end, "rb", buffering=0), open_log(log_file), redactor, name="e")
    pump.start()
    for data in writes:
        os.write(write_end, data)
        if pause_s:
            time.sleep(pause_s)  # the engine pausing mid-line: the pump's idle flush must not leak a split secret
    os.close(write_end)
    pump.join(10)
    assert not pump.is_alive()
    return log_file.read_text()


@pytest.mark.timeout(30)
def test_a_secret_split_between_two_writes_is_still_masked(tmp_path: Path) -> None:
    key = "sk-ABCDEFGHIJKLMNOP"
    text = pump_through(
        tmp_path, Redactor([key]), [b"partial line with sk-ABCDEFG", b"HIJKLMNOP and more\n"], pause_s=IDLE_FLUSH_S * 2
    )
    assert key not in text and "sk-ABCDEFG" not in text and text == f"partial line with {MASK} and more\n"


@pytest.mark.timeout(30)
def test_long_lines_and_progress_bars_pass_through_masked(tmp_path: Path) -> None:
    key = "sk-0123456789"
    chunks = [
        b"x" * 70000 + key.encode() + b"y" * 10,
        b"\r 10%" + key.encode(),
        b"\r 100%\n",
        b"last line without newline " + key.encode(),
    ]
    text = pump_through(tmp_path, Redactor([key]), chunks)
    assert key not in text
    assert text.count(MASK) == 3 and text.endswith("last line without newline " + MASK)
    assert len(text) == 70000 + len(MASK) + 10 + len(f"\r 10%{MASK}\r 100%\n") + len(
        "last line without newline "
    ) + len(MASK)


def test_log_files_are_0600_in_a_0700_directory(tmp_path: Path) -> None:
    old = tmp_path / "existing.log"
    old.write_text("from an older run\n")
    old.chmod(0o644)
    for path in (tmp_path / "new" / "e.log", old):
        fd = open_log(path)
        os.close(fd)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700


@pytest.mark.timeout(30)
def test_spawned_engine_output_reaches_its_log_redacted(tmp_path: Path) -> None:
    import sys

    from model_server.launcher import processes as procs
    from model_server.launcher.command import LaunchCommand

    code = "import os, sys; k = os.environ['K']; print(f'server_args=ServerArgs(api_key={k!r})'); sys.stderr.write(f'key {k}\\n')"
    command = LaunchCommand("e", (sys.executable, "-c", code), {"K": KEY})  # the header shows K shell-quoted
    proc = procs.spawn_engine(command, tmp_path / "e.log", redactor=Redactor([KEY]), tag="o/r/e")
    assert proc.wait(10) == 0
    proc.log_pump.join(5)
    text = (tmp_path / "e.log").read_text()
    assert "starting e: K=*** " in text and "api_key='***'" in text and f"key {MASK}" in text and KEY not in text
    assert stat.S_IMODE((tmp_path / "e.log").stat().st_mode) == 0o600
    assert threading.active_count() >= 1
