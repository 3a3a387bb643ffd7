"""Command building (pure) and `--dry-run` on the shipped tables: exact argv, env, no key anywhere."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from model_server.config import LaunchPolicy, ServerSpec, load_fleet
from model_server.launcher.command import build_command

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
KEY = "sk-test-Do-Not-Leak-7f3a"


def spec(**fields: object) -> ServerSpec:
    base: dict[str, object] = {
        "name": "s",
        "group": "8",
        "kind": "completion",
        "host": "10.0.0.1",
        "port": 8056,
        "model": "m/x",
        "gpus": (1,),
    }
    base.update(fields)
    return ServerSpec(**base)


def test_sglang_completion_command_is_exact() -> None:
    cmd = build_command(
        spec(served_model_name="llama", args=("--log-level", "warning")),
        LaunchPolicy(),
        0.7,
        key_file="/run/k.yaml",
        python="py",
    )
    assert cmd.argv == (
        "py", "-m", "sglang.launch_server", "--model-path", "m/x", "--tp-size", "1", "--host", "0.0.0.0",
        "--port", "8056", "--mem-fraction-static", "0.7", "--context-length", "131072",
        "--chunked-prefill-size", "16384", "--served-model-name", "llama", "--enable-metrics",
        "--enable-p2p-check", "--dtype", "auto", "--config", "/run/k.yaml", "--log-level", "warning",
    )  # fmt: skip
    assert dict(cmd.env) == {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def test_embedding_uses_its_own_sizes_and_optional_flags_drop_out() -> None:
    policy = LaunchPolicy(enable_metrics=False, embedding_chunked_prefill_size=None)
    cmd = build_command(spec(kind="embedding", gpus=(0, 5)), policy, 0.8, python="py")
    assert cmd.argv == (
        "py", "-m", "sglang.launch_server", "--model-path", "m/x", "--tp-size", "2", "--host", "0.0.0.0",
        "--port", "8056", "--mem-fraction-static", "0.8", "--context-length", "32768", "--is-embedding",
        "--enable-p2p-check", "--dtype", "auto",
    )  # fmt: skip
    assert cmd.env["CUDA_VISIBLE_DEVICES"] == "0,5"


def test_sim_engine_takes_the_sglang_flags_it_knows() -> None:
    policy = LaunchPolicy(engine="sim", bind_host="127.0.0.1")
    cmd = build_command(spec(args=("--ttft-ms", "5")), policy, 0.8, key_file="k.yaml", python="py")
    assert cmd.argv[:4] == ("py", "-m", "model_server", "sim")
    assert "--enable-p2p-check" not in cmd.argv and "--dtype" not in cmd.argv
    assert cmd.argv[-4:] == ("--config", "k.yaml", "--ttft-ms", "5")
    assert cmd.argv[cmd.argv.index("--host") + 1] == "127.0.0.1"


def test_no_gpus_means_no_cuda_variables_and_render_quotes() -> None:
    cmd = build_command(spec(gpus=(), model="dir with space/m"), LaunchPolicy(), 0.8, python="py")
    assert dict(cmd.env) == {}
    assert "'dir with space/m'" in cmd.render()
    cmd = build_command(spec(gpus=(2, 3)), LaunchPolicy(), 0.8, python="py")
    assert cmd.render().startswith("CUDA_VISIBLE_DEVICES=2,3 CUDA_DEVICE_ORDER=PCI_BUS_ID py -m sglang.launch_server ")


# ---- the dry run, end to end -------------------------------------------------------------


def dry_run(config: Path, cwd: Path, *extra: str) -> dict[str, tuple[dict[str, str], list[str]]]:
    env = {**os.environ, "MODEL_SERVER_API_KEY": KEY}
    out = subprocess.run(
        [PY, str(ROOT / "serve_llm_pipeline.py"), "--config", str(config), "--host-ip", "192.0.2.11", "--dry-run", *extra],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert KEY not in out.stdout and KEY not in out.stderr
    commands = {}
    for line in out.stdout.splitlines():
        words = shlex.split(line)
        env_part = {}
        while "=" in words[0] and not words[0].startswith("/"):
            k, v = words.pop(0).split("=", 1)
            env_part[k] = v
        port = words[words.index("--port") + 1]
        commands[port] = (env_part, words)
    assert not (cwd / "run").exists()  # a dry run writes nothing, key file included
    return commands


def sglang_argv(
    model: str, tp: int, port: int, context: int, prefill: int, key: Path, embedding: bool = False
) -> list[str]:
    argv = [PY, "-m", "sglang.launch_server", "--model-path", model, "--tp-size", str(tp), "--host", "0.0.0.0",
            "--port", str(port), "--mem-fraction-static", "0.8", "--context-length", str(context),
            "--chunked-prefill-size", str(prefill), "--enable-metrics"]  # fmt: skip
    if embedding:
        argv.append("--is-embedding")
    return [*argv, "--enable-p2p-check", "--dtype", "auto", "--config", str(key)]


def test_dry_run_of_servers_toml_gives_exact_commands(tmp_path: Path) -> None:
    commands = dry_run(ROOT / "configs" / "servers.toml", tmp_path)
    assert len(commands) == 8
    secrets = tmp_path / "run" / "secrets"
    env, argv = commands["8056"]
    assert env == {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert argv == sglang_argv("meta-llama/Llama-3.1-8B-Instruct", 1, 8056, 131072, 16384, secrets / "llama8b-1.yaml")
    env, argv = commands["7777"]
    assert env == {"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert argv == sglang_argv(
        "Alibaba-NLP/gte-Qwen2-7B-instruct", 1, 7777, 32768, 4096, secrets / "gte7b-embed.yaml", embedding=True
    )


def seventy_b_table(tmp_path: Path) -> Path:
    """servers.toml with the 70B uncommented and the servers of GPUs 0-3 removed."""
    text = (ROOT / "configs" / "servers.toml").read_text()
    main, tail = text.split("# A 70B on 4 GPUs", 1)
    commented = tail.split("# [[servers]]\n", 1)[1]
    seventy = "".join(line[2:] + "\n" for line in commented.splitlines() if line.startswith("# "))
    head, *blocks = re.split(r"(?m)^\[\[servers\]\]\n", main)
    keep = [b for b in blocks if not re.search(r"(?m)^gpus = \[[0-3]\]", b)]
    out = head + "".join("[[servers]]\n" + b for b in keep) + "[[servers]]\n" + seventy
    path = tmp_path / "servers70.toml"
    path.write_text(out)
    fleet = load_fleet(path)  # still a valid table
    assert [s.name for s in fleet.servers if len(s.gpus) == 4] == ["llama70b"]
    return path


def test_dry_run_of_a_4_gpu_server(tmp_path: Path) -> None:
    commands = dry_run(seventy_b_table(tmp_path), tmp_path, "--only", "llama70b")
    assert list(commands) == ["8400"]
    env, argv = commands["8400"]
    assert env == {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    key = tmp_path / "run" / "secrets" / "llama70b.yaml"
    assert argv == sglang_argv("meta-llama/Llama-3.1-70B-Instruct", 4, 8400, 131072, 16384, key)


def test_dry_run_of_local_toml_prints_one_command_per_server() -> None:
    out = subprocess.run(
        [PY, "serve_llm_pipeline.py", "--config", "configs/local.toml", "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    fleet = load_fleet(ROOT / "configs" / "local.toml")
    assert len(lines) == len(fleet.servers)
    for line, s in zip(lines, fleet.servers):
        words = shlex.split(line)
        assert words[2:6] == [PY, "-m", "model_server", "sim"]
        assert words[words.index("--port") + 1] == str(s.port)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--only", "nope"], "no server of the table has that name. The servers are: llama8b-1"),
        (["--host-ip", "198.51.100.7"], "no server of the table runs on this machine"),
    ],
)
def test_bad_selection_exits_2_with_a_clear_message(tmp_path: Path, args: list[str], needle: str) -> None:
    config = ROOT / "configs" / "servers.toml"
    cmd = [PY, str(ROOT / "serve_llm_pipeline.py"), "--config", str(config), "--dry-run", *args]
    if "--host-ip" not in args:
        cmd += ["--host-ip", "192.0.2.11"]
    out = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60, env={**os.environ, "MODEL_SERVER_API_KEY": KEY}
    )
    assert out.returncode == 2
    assert needle in out.stderr and "Traceback" not in out.stderr


def test_sglang_server_without_gpus_is_refused_at_launch(tmp_path: Path) -> None:
    table = tmp_path / "nogpu.toml"
    table.write_text(
        '[[servers]]\nname = "bare"\ngroup = "8"\nkind = "completion"\nhost = "192.0.2.11"\nport = 8056\nmodel = "m"\n'
    )
    load_fleet(table)  # a valid table: a client-only fleet need not say where the GPUs are
    cmd = [PY, str(ROOT / "serve_llm_pipeline.py"), "--config", str(table), "--host-ip", "192.0.2.11", "--dry-run"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "server 'bare' (servers[0]): field 'gpus' is empty" in out.stderr and "Traceback" not in out.stderr


# ---- the dry run's memory fraction: from the GPUs' memory now, by the supervisor's own decision -----------

GPU_STATE = {"1": 3000, "2": 9000, "3": 30000}  # of 40000 MiB: 92.5% free, 77.5% free (short), busy; GPUs 0 and 4 idle


def local_with_gpus(tmp_path: Path) -> Path:
    import json

    from _pipeline_runs import local_copy

    state = tmp_path / "gpus.json"
    state.write_text(json.dumps(GPU_STATE))
    config = local_copy(tmp_path, inventory=f"state_file = {json.dumps(str(state))}")
    config.write_text(config.read_text().replace("total_mib = 81920", "total_mib = 40000"))
    return config


def test_dry_run_chooses_the_memory_fraction_the_supervisor_would(tmp_path: Path) -> None:
    from model_server.launcher.events import BareEvent, GpusRead
    from model_server.launcher.gpu import make_inventory
    from model_server.launcher.pipeline import dry_run_commands, plan
    from model_server.launcher.steps import Settings, Supervision, step

    p = plan(local_with_gpus(tmp_path))
    lines = {line.server: line for line in dry_run_commands(p)}
    assert {n: line.mem_fraction for n, line in lines.items()} == {
        "chat-1": 0.7, "chat-2": None, "chat-3": 0.8, "embed-1": 0.8, "embed-2": 0.8,
    }  # fmt: skip
    argv = lines["chat-1"].command.argv
    assert (
        argv[argv.index("--mem-fraction-static") + 1] == "0.7"
        and lines["chat-1"].basis == "GPU 1: 3000 of 40000 MiB used"
    )
    assert lines["chat-2"].command is None
    assert "GPU memory is not enough: GPU 2: 9000 of 40000 MiB used (77.5% free)" in lines["chat-2"].basis
    assert (
        "busy now (GPU 3: 30000 of 40000 MiB used), so a real run waits for them; this is for idle GPUs"
        in lines["chat-3"].basis
    )
    inventory = make_inventory(p.fleet.gpu_inventory)
    for s in p.servers:  # the supervisor, given the same readings, starts with the same fraction
        if s.name in ("chat-2", "chat-3"):
            continue
        state, _ = step(Supervision(Settings(s, p.fleet.launch, "log", rand=lambda: 0.5)), BareEvent.TICK, 0.0)
        state, _ = step(state, GpusRead(tuple(inventory.read(s.gpus))), 0.0)
        assert state.phase.mem_fraction == lines[s.name].mem_fraction, s.name


def test_dry_run_prints_the_chosen_fraction_and_exits_1_for_a_server_it_would_refuse(tmp_path: Path) -> None:
    config = local_with_gpus(tmp_path)
    cmd = [PY, str(ROOT / "serve_llm_pipeline.py"), "--config", str(config), "--dry-run"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    fractions = sorted(
        shlex.split(line)[shlex.split(line).index("--mem-fraction-static") + 1] for line in out.stdout.splitlines()
    )
    assert fractions == ["0.7", "0.8", "0.8", "0.8"]  # chat-2 is refused: no command for it
    assert "dry run: server chat-1: --mem-fraction-static 0.7 (GPU 1: 3000 of 40000 MiB used)" in out.stderr
    assert "dry run: server chat-2 would not start: server 'chat-2': GPU memory is not enough" in out.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "logs").exists()  # nothing started, nothing written
