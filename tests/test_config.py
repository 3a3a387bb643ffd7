"""The fleet table: one test per class of bad input, asserting on the message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from model_server.config import Fleet, RoutingPolicy, ServerKind, load_fleet, parse_fleet
from model_server.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

GOOD = """
[[servers]]
name = "a"
group = "8"
kind = "completion"
host = "10.0.0.1"
port = 8000
model = "m"
gpus = [0]

[[servers]]
name = "b"
group = "8"
kind = "completion"
host = "10.0.0.1"
port = 8001
model = "m"
gpus = [1, 2]
"""


def _error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_fleet(text, source="fleet.toml")
    message = str(info.value)
    assert message.startswith("fleet.toml: "), message
    assert "\n" not in message.strip()  # one paragraph
    return message


def _server(**fields: object) -> str:
    port = fields.get("port", 9000)
    base: dict[str, object] = {
        "group": "8",
        "kind": "completion",
        "host": "h",
        "port": port,
        "model": "m",
        "gpus": [abs(port) % 64 if isinstance(port, int) else 0],
    }
    base.update(fields)
    lines = ["[[servers]]"]
    for key, value in base.items():
        if isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        elif isinstance(value, list):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


def test_good_table_parses_with_defaults() -> None:
    fleet = parse_fleet(GOOD, source="fleet.toml")
    assert [s.name for s in fleet.group("8")] == ["a", "b"]
    assert fleet.servers[1].tp_size == 2
    assert fleet.client.routing is RoutingPolicy.p2c
    assert fleet.launch.gpu_free_threshold_mib == 10000  # the original's threshold
    rules = [(r.min_free_ratio, r.mem_fraction_static) for r in fleet.launch.mem_fraction_policy]
    assert rules == [(0.95, 0.80), (0.85, 0.70)]
    assert fleet.source == "fleet.toml"


def test_group_given_as_number_means_its_text() -> None:
    fleet = parse_fleet(_server(group=70, gpus=[0, 1, 2, 3]))
    assert fleet.servers[0].group == "70"
    assert fleet.group(70) == fleet.servers


def test_default_name_is_group_at_address() -> None:
    assert parse_fleet(_server()).servers[0].name == "8@h:9000"


def test_malformed_toml_names_the_line() -> None:
    text = GOOD + "\n[[servers]\n"
    broken_line = text.splitlines().index("[[servers]", 3) + 1
    message = _error(text)
    assert "malformed TOML" in message
    assert f"line {broken_line}," in message


def test_unknown_key_is_named_with_its_server() -> None:
    message = _error(GOOD.replace("port = 8001", "port = 8001\nprot = 8002"))
    assert "server 'b' (servers[1]), field 'prot' is not a known key" in message


def test_unknown_section_key_is_named() -> None:
    message = _error("[launch]\ngpu_free_treshold_mib = 5\n" + GOOD)
    assert "field 'launch.gpu_free_treshold_mib' is not a known key" in message


def test_duplicate_host_port() -> None:
    message = _error(GOOD.replace("port = 8001", "port = 8000"))
    assert "server 'b' (servers[1])" in message
    assert "duplicate 10.0.0.1:8000 of server 'a' (servers[0])" in message


def test_same_port_on_two_hosts_is_fine() -> None:
    fleet = parse_fleet(
        GOOD.replace("port = 8001", "port = 8000").replace(
            'host = "10.0.0.1"\nport = 8000\nmodel = "m"\ngpus = [1, 2]',
            'host = "10.0.0.2"\nport = 8000\nmodel = "m"\ngpus = [1, 2]',
        )
    )
    assert {s.host for s in fleet.servers} == {"10.0.0.1", "10.0.0.2"}


def test_gpu_shared_by_two_servers_of_one_host() -> None:
    message = _error(GOOD.replace("gpus = [1, 2]", "gpus = [2, 0]"))
    assert "server 'b' (servers[1]): field 'gpus' uses GPU 0 of host 10.0.0.1" in message
    assert "server 'a'" in message


def test_gpu_index_reused_on_another_host_is_fine() -> None:
    text = _server(name="x", host="h1", gpus=[0]) + _server(name="y", host="h2", gpus=[0])
    assert len(parse_fleet(text).servers) == 2


def test_group_that_mixes_kinds() -> None:
    message = _error(
        GOOD.replace(
            'kind = "completion"\nhost = "10.0.0.1"\nport = 8001', 'kind = "embedding"\nhost = "10.0.0.1"\nport = 8001'
        )
    )
    assert "server 'b' (servers[1]): field 'kind' is embedding but group '8' is completion" in message


def test_empty_model() -> None:
    message = _error(_server(name="e", model="  "))
    assert "server 'e' (servers[0]), field 'model' is empty" in message


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_port_out_of_range(port: int) -> None:
    message = _error(_server(name="p", port=port))
    assert "server 'p' (servers[0]), field 'port'" in message
    assert str(port) in message


def test_negative_gpu_index() -> None:
    message = _error(_server(name="n", gpus=[0, -1]))
    assert "field 'gpus' has negative GPU index -1" in message


def test_repeated_gpu_index() -> None:
    message = _error(_server(name="r", gpus=[3, 3]))
    assert "field 'gpus' repeats GPU index 3" in message


def test_duplicate_name() -> None:
    message = _error(_server(name="x", port=1) + _server(name="x", port=2))
    assert "field 'name' repeats the name of servers[0]" in message


def test_wrong_kind_value() -> None:
    message = _error(_server(name="k", kind="chat"))
    assert "server 'k' (servers[0]), field 'kind'" in message
    assert "'chat'" in message


def test_no_servers() -> None:
    assert "no [[servers]] entries" in _error("[launch]\nengine = 'sim'\n")


def test_missing_required_field() -> None:
    message = _error('[[servers]]\nname = "z"\ngroup = "8"\nkind = "completion"\nhost = "h"\nmodel = "m"\n')
    assert "server 'z' (servers[0]), field 'port' is required but missing" in message


def test_timeout_floor_above_ceiling() -> None:
    message = _error("[client]\nrequest_timeout_floor_s = 10\nrequest_timeout_ceiling_s = 1\n" + GOOD)
    assert "request_timeout_floor_s (10.0) is above request_timeout_ceiling_s (1.0)" in message


def test_api_key_variable_named_but_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MS_TEST_KEY", raising=False)
    fleet = parse_fleet('api_key_env = "MS_TEST_KEY"\n' + GOOD, source="fleet.toml")
    assert fleet.api_key(required=False) is None
    with pytest.raises(ConfigError) as info:
        fleet.api_key()
    assert "MS_TEST_KEY" in str(info.value) and "export MS_TEST_KEY=" in str(info.value)
    monkeypatch.setenv("MS_TEST_KEY", "s3cret")
    assert fleet.api_key() == "s3cret"


def test_no_api_key_variable_means_no_key() -> None:
    assert parse_fleet(GOOD).api_key() is None


def test_unknown_server_name_lists_the_names() -> None:
    fleet = parse_fleet(GOOD, source="fleet.toml")
    with pytest.raises(ConfigError, match="no server is named 'c'.*a, b"):
        fleet.server("c")


def test_missing_file_points_at_local_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the fleet table.*configs/local.toml"):
        load_fleet(tmp_path / "absent.toml")


def test_env_variable_picks_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(GOOD)
    monkeypatch.setenv("MODEL_SERVER_CONFIG", str(path))
    assert load_fleet().source == str(path)


@pytest.mark.parametrize("name", ["servers.toml", "local.toml"])
def test_shipped_configs_are_valid(name: str) -> None:
    fleet = load_fleet(ROOT / "configs" / name)
    kinds = {g: s[0].kind for g, s in fleet.groups.items()}
    assert kinds == {"8": ServerKind.completion, "7": ServerKind.embedding}


def test_example_fleet_has_the_original_shape() -> None:
    fleet = load_fleet(ROOT / "configs" / "servers.toml")
    chat = fleet.group("8")
    assert [s.port for s in chat] == list(range(8056, 8105, 8))
    assert [s.gpus for s in chat] == [(g,) for g in range(1, 8)]
    assert [(s.port, s.gpus) for s in fleet.group("7")] == [(7777, (0,))]
    assert fleet.api_key_env == "MODEL_SERVER_API_KEY"


def test_local_fleet_is_simulated_on_loopback() -> None:
    fleet = load_fleet(ROOT / "configs" / "local.toml")
    assert fleet.launch.engine == "sim" and fleet.gpu_inventory.source == "simulated"
    assert {s.host for s in fleet.servers} == {"127.0.0.1"}
    assert len(fleet.group("8")) >= 3 and len(fleet.group("7")) >= 2


def test_models_are_frozen() -> None:
    fleet = parse_fleet(GOOD)
    with pytest.raises(ValidationError):
        fleet.servers[0].port = 1  # type: ignore[misc]
    assert isinstance(fleet, Fleet)


# ---- fuzzing: nothing but ConfigError ever escapes --------------------------------

_keys = st.sampled_from(
    [
        "servers",
        "group",
        "kind",
        "host",
        "port",
        "model",
        "gpus",
        "name",
        "launch",
        "client",
        "args",
        "api_key_env",
        "gpu_inventory",
        "engine",
        "routing",
        "x",
    ]
)
_scalars = st.one_of(
    st.integers(-(2**70), 2**70),
    st.text(max_size=8),
    st.booleans(),
    st.floats(allow_nan=True),
    st.lists(st.integers(-3, 3), max_size=4),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.text(max_size=400))
def test_random_text_only_raises_config_error(text: str) -> None:
    try:
        parse_fleet(text)
    except ConfigError:
        pass


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.data())
def test_mutated_table_only_raises_config_error(data: st.DataObject) -> None:
    lines = GOOD.strip().splitlines()
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(lines) - 1))
        action = data.draw(st.sampled_from(["drop", "dup", "value", "key", "garble"]))
        if action == "drop":
            lines.pop(i)
        elif action == "dup":
            lines.insert(i, lines[i])
        elif action == "value" and "=" in lines[i]:
            key = lines[i].split("=")[0].strip()
            value = data.draw(_scalars)
            lines[i] = f"{key} = {value!r}".replace("'", '"').replace("True", "true").replace("False", "false")
        elif action == "key" and "=" in lines[i]:
            lines[i] = f"{data.draw(_keys)} = {lines[i].split('=', 1)[1].strip()}"
        else:
            lines[i] = lines[i][: data.draw(st.integers(0, len(lines[i])))] + data.draw(st.text(max_size=4))
        if not lines:
            break
    try:
        parse_fleet("\n".join(lines))
    except ConfigError:
        pass


# ---- the CLI --------------------------------------------------------------------


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "model_server", "check", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


@pytest.mark.parametrize("name", ["servers.toml", "local.toml"])
def test_check_accepts_shipped_configs(name: str) -> None:
    result = _check(f"configs/{name}")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "group '8'" in result.stdout


def test_check_rejects_with_status_2_and_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("port = 8001", "port = 8000"))
    result = _check(str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{bad}: invalid fleet table" in result.stderr and "duplicate 10.0.0.1:8000" in result.stderr


# ---- issue 9 case 13: every duration bounded, every parse error caught -------------------------------

LAUNCH_DURATIONS = [
    "gpu_poll_interval_s", "gpu_wait_timeout_s", "startup_timeout_s", "health_interval_s", "health_timeout_s",
    "restart_backoff_initial_s", "restart_backoff_max_s", "restart_window_s", "stop_grace_s", "drain_timeout_s",
    "drain_notice_s",
]  # fmt: skip


@pytest.mark.parametrize("field", LAUNCH_DURATIONS)
@pytest.mark.parametrize("value", ["1e10", "inf", "nan", "-1", "1e400"])
def test_every_launch_duration_is_bounded(field: str, value: str) -> None:
    message = _error(f'[launch]\nengine = "sim"\n{field} = {value}\n' + GOOD)
    assert f"field 'launch.{field}'" in message


def test_every_launch_float_field_has_an_upper_bound() -> None:
    """A new duration without a bound would reach a timer that cannot hold it (OverflowError): pin them all."""
    from model_server.config import LaunchPolicy

    floats = [n for n, f in LaunchPolicy.model_fields.items() if f.annotation in (float, float | None)]
    assert sorted(floats) == sorted(LAUNCH_DURATIONS)
    for name in floats:
        assert any(getattr(m, "le", None) is not None for m in LaunchPolicy.model_fields[name].metadata), name


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('log_dir = ""', "field 'launch.log_dir'"),
        ('log_dir = "   "', "field 'launch.log_dir'"),
        ('status_file = ""', "field 'launch.status_file'"),
        ('log_dir = "a\\u0000b"', "contains a NUL character"),
        (f"context_length = {2**40}", "field 'launch.context_length'"),
        (f"gpu_free_threshold_mib = {2**70}", "field 'launch.gpu_free_threshold_mib'"),
        (f"max_restarts = {2**70}", "field 'launch.max_restarts'"),
        ('secret_env = ["HF TOKEN"]', "'HF TOKEN', which is not an environment variable name"),
        (
            "restart_backoff_initial_s = 10\nrestart_backoff_max_s = 1",
            "field 'launch.restart_backoff_initial_s' (10) is above",
        ),
    ],
)
def test_launch_values_that_would_fail_later_are_refused_now(line: str, expected: str) -> None:
    assert expected in _error(f'[launch]\nengine = "sim"\n{line}\n' + GOOD)


def test_sglang_health_timeout_leaves_room_for_health_generate() -> None:
    message = _error("[launch]\nhealth_timeout_s = 1\n" + GOOD)
    assert (
        "field 'launch.health_timeout_s' is 1 s" in message
        and "/health_generate" in message
        and "at least 2 s" in message
    )
    parse_fleet("[launch]\nhealth_timeout_s = 2\n" + GOOD)
    parse_fleet('[launch]\nengine = "sim"\nhealth_timeout_s = 0.5\n' + GOOD)  # the sim can answer at once (its flag)


@pytest.mark.parametrize("arg", ["--api-key", "--api-key=sk-1", "--admin-api-key"])
def test_a_key_in_the_engine_args_is_refused(arg: str) -> None:
    message = _error(_server(name="k", args=[arg, "v"]).replace("'", '"'))
    assert f"server 'k' (servers[0]), field 'args' has {arg.split('=')[0]}" in message and "api_key_env" in message
    assert "sk-1" not in message


def test_server_values_with_nul_or_huge_gpu_indices_are_refused() -> None:
    assert "contains a NUL character" in _error(_server(name="n", model="m\\u0000x"))
    assert "has GPU index 4096, above 1023" in _error(_server(name="g", gpus=[4096]))
    assert "field 'api_key_env' holds 'A=B'" in _error('api_key_env = "A=B"\n' + GOOD)


@pytest.mark.parametrize(
    "text",
    [
        "x = " + "[" * 5000 + "]" * 5000,
        "x = " + "{a = " * 3000 + "1" + "}" * 3000,
        "[launch]\nmem_fraction_policy = " + "[" * 400 + "]" * 400,
        "gpus = " + "[" * 300 + "]" * 300,
    ],
)
def test_deep_nesting_is_a_config_error(text: str) -> None:
    message = _error(text + "\n" + GOOD)
    assert len(message) < 1500


def test_check_refuses_deep_nesting_without_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "deep.toml"
    bad.write_text("x = " + "[" * 100000 + "]" * 100000 + "\n" + GOOD)
    result = _check(str(bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{bad}: malformed TOML: arrays or inline tables are nested" in result.stderr


_deep = st.integers(1, 3000).flatmap(
    lambda depth: st.sampled_from(
        ["[" * depth + "]" * depth, "{a = " * depth + "1" + "}" * depth, "[" * depth + "1" + "]" * depth]
    )
)
_huge = st.one_of(
    st.sampled_from(
        [
            "inf",
            "-inf",
            "nan",
            "1e308",
            "1e309",
            "-1e400",
            "9223372036854775808",
            str(2**200),
            "0x7fffffffffffffff",
            "1e-400",
        ]
    ),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: repr(f).replace("inf", "inf").replace("nan", "nan")),
    st.integers(-(2**256), 2**256).map(str),
)
_any_field = st.sampled_from(
    [
        f"[launch]\n{f}"
        for f in LAUNCH_DURATIONS
        + ["context_length", "max_restarts", "health_failures_to_restart", "gpu_free_threshold_mib"]
    ]
    + [
        f"[client]\n{f}"
        for f in ("initial_latency_s", "connect_timeout_s", "max_retry", "breaker_cooldown_s", "request_deadline_s")
    ]
    + [f"[gpu_inventory]\n{f}" for f in ("count", "total_mib")]
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(field=_any_field, value=st.one_of(_deep, _huge))
def test_fuzz_deep_nesting_and_huge_numbers_only_raise_config_error(field: str, value: str) -> None:
    section, name = field.split("\n")
    try:
        fleet = parse_fleet(f"{section}\n{name} = {value}\n" + GOOD.replace("[[servers]]", "[[servers]]", 1))
    except ConfigError as err:
        assert len(str(err)) < 2000 and "\n" not in str(err).strip()
        return
    for policy in (fleet.launch, fleet.client, fleet.gpu_inventory):  # what passed is usable
        for value_ in policy.model_dump().values():
            if isinstance(value_, float):
                assert value_ == value_ and value_ < 1e7  # no nan, nothing a timer cannot hold


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("control_port = 0", "field 'launch.control_port'"),
        ("control_port = 70000", "field 'launch.control_port'"),
        ('control_port = "x"', "field 'launch.control_port'"),
        ('control_key_env = "my key"', "not an environment variable name"),
        ("drain_timeout_s = 0", "field 'launch.drain_timeout_s'"),
    ],
)
def test_control_api_fields_are_checked(line: str, expected: str) -> None:
    assert expected in _error(f'[launch]\nengine = "sim"\n{line}\n' + GOOD)


def test_the_control_key_comes_from_the_variable_the_table_names(monkeypatch: pytest.MonkeyPatch) -> None:
    from model_server.config import LaunchPolicy

    policy = LaunchPolicy(engine="sim", control_port=9100, control_key_env="MS_CONTROL_KEY_FOR_TEST")
    assert policy.drain_timeout_s == 120 and LaunchPolicy().control_port is None
    monkeypatch.delenv("MS_CONTROL_KEY_FOR_TEST", raising=False)
    with pytest.raises(ConfigError, match="export MS_CONTROL_KEY_FOR_TEST=<a long random key>"):
        policy.control_key()
    monkeypatch.setenv("MS_CONTROL_KEY_FOR_TEST", "k" * 20)
    assert policy.control_key() == "k" * 20
