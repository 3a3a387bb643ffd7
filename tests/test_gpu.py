"""GPU inventories (simulated, NVML through a fake module) and the pure memory decisions."""

from __future__ import annotations

import json
import sys
import types

import pytest
from hypothesis import given
from hypothesis import strategies as st

from model_server.config import GpuInventoryConfig, LaunchPolicy, MemFractionRule
from model_server.errors import LaunchError
from model_server.launcher.gpu import NvmlInventory, SimulatedInventory, make_inventory
from model_server.launcher.gpu_memory import GpuReading, busy_gpus, choose_mem_fraction, is_free, lowest_free_ratio

RULES = LaunchPolicy().mem_fraction_policy  # the original's: >= 0.95 -> 0.80, >= 0.85 -> 0.70


def reading(used: int, total: int = 81920, index: int = 0) -> GpuReading:
    return GpuReading(index, used, total)


def test_free_means_used_below_threshold() -> None:
    assert is_free(reading(9999), 10000)
    assert not is_free(reading(10000), 10000)
    assert busy_gpus([reading(0, index=0), reading(20000, index=1)], 10000) == [reading(20000, index=1)]


def test_free_ratio_and_lowest() -> None:
    r = reading(8192, 81920)
    assert r.free_mib == 73728
    assert r.free_ratio == pytest.approx(0.9)
    assert lowest_free_ratio([reading(0), reading(8192)]) == pytest.approx(0.9)
    assert lowest_free_ratio([]) == 1.0


@pytest.mark.parametrize(
    ("used_mib", "expected"),
    [(0, 0.80), (4096, 0.80), (4097, 0.70), (12288, 0.70)],  # 0.95 x 81920 = 77824 free -> used 4096
)
def test_original_mem_fraction_policy(used_mib: int, expected: float) -> None:
    assert choose_mem_fraction(RULES, [reading(0, index=1), reading(used_mib, index=2)]) == expected


def test_short_memory_is_refused_with_numbers() -> None:
    with pytest.raises(LaunchError) as info:
        choose_mem_fraction(RULES, [reading(0, 40000, 1), reading(9000, 40000, 2)], server="chat-2")
    message = str(info.value)
    assert "GPU memory is not enough" in message
    assert "chat-2" in message and "GPU 2" in message and "9000 of 40000 MiB" in message
    assert "77.5% free" in message and "85%" in message


def test_first_matching_rule_wins_in_given_order() -> None:
    rules = (MemFractionRule(min_free_ratio=0.5, mem_fraction_static=0.3),)
    assert choose_mem_fraction(rules, [reading(10000, 40000)]) == 0.3


@given(st.lists(st.integers(min_value=0, max_value=81920), min_size=1, max_size=8))
def test_choice_depends_on_the_fullest_gpu_only(used: list[int]) -> None:
    readings = [reading(u, 81920, i) for i, u in enumerate(used)]
    ratio = lowest_free_ratio(readings)
    if ratio >= 0.95:
        assert choose_mem_fraction(RULES, readings) == 0.80
    elif ratio >= 0.85:
        assert choose_mem_fraction(RULES, readings) == 0.70
    else:
        with pytest.raises(LaunchError):
            choose_mem_fraction(RULES, readings)


def test_simulated_inventory_rereads_its_state_file(tmp_path) -> None:
    state = tmp_path / "gpus.json"
    inv = make_inventory(GpuInventoryConfig(source="simulated", count=4, total_mib=1000, state_file=str(state)))
    assert isinstance(inv, SimulatedInventory)
    assert [r.used_mib for r in inv.read([0, 3])] == [0, 0]  # no file yet: idle
    state.write_text(json.dumps({"3": 700}))
    assert inv.read([0, 3]) == [GpuReading(0, 0, 1000), GpuReading(3, 700, 1000)]
    state.write_text(json.dumps({"3": 5}))
    assert inv.read([3])[0].used_mib == 5


def test_simulated_inventory_errors(tmp_path) -> None:
    with pytest.raises(LaunchError, match="GPU 4 does not exist.*4 GPUs"):
        SimulatedInventory(4, 1000).read([4])
    bad = tmp_path / "gpus.json"
    bad.write_text("[1, 2")
    with pytest.raises(LaunchError, match="not a JSON object"):
        SimulatedInventory(4, 1000, bad).read([0])


class _Mem:
    def __init__(self, used: int, total: int) -> None:
        self.used, self.total = used, total


def _fake_pynvml(init_error: Exception | None = None) -> types.ModuleType:
    mod = types.ModuleType("pynvml")

    def nvmlInit() -> None:
        if init_error:
            raise init_error

    mod.nvmlInit = nvmlInit
    mod.nvmlDeviceGetCount = lambda: 2
    mod.nvmlDeviceGetHandleByIndex = lambda i: f"handle-{i}"
    mod.nvmlDeviceGetMemoryInfo = lambda h: _Mem(1024 * 1024 * (100 if h == "handle-0" else 2048), 1024 * 1024 * 81920)
    return mod


def test_nvml_inventory_reports_mib_per_index(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    inv = NvmlInventory()
    assert inv.read([1, 0]) == [GpuReading(1, 2048, 81920), GpuReading(0, 100, 81920)]
    with pytest.raises(LaunchError, match="GPU 2 does not exist"):
        inv.read([2])


def test_missing_nvml_points_at_the_local_config(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(RuntimeError("NVML Shared Library Not Found")))
    with pytest.raises(LaunchError) as info:
        make_inventory(GpuInventoryConfig(source="nvml"))
    message = str(info.value)
    assert "NVML Shared Library Not Found" in message and "configs/local.toml" in message


# ---- who holds a GPU (NVML's process list) ------------------------------------------------------


class _Proc:
    def __init__(self, pid: int, used: int | None) -> None:
        self.pid, self.usedGpuMemory = pid, used


def test_nvml_lists_the_processes_holding_each_gpu(monkeypatch) -> None:
    from model_server.launcher.gpu import gpu_processes
    from model_server.launcher.gpu_memory import GpuProcess

    mod = _fake_pynvml()
    mod.nvmlDeviceGetComputeRunningProcesses = lambda h: [_Proc(11, 1024 * 1024 * 500)] if h == "handle-1" else []
    mod.nvmlDeviceGetGraphicsRunningProcesses = lambda h: [_Proc(12, None)] if h == "handle-1" else []
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    assert gpu_processes(NvmlInventory(), [0, 1]) == [GpuProcess(1, 11, 500), GpuProcess(1, 12, None)]
    assert GpuProcess(1, 11, 500).describe() == "pid 11 holds 500 MiB of GPU 1"


def test_a_driver_without_process_lists_reports_none(monkeypatch) -> None:
    from model_server.launcher.gpu import gpu_processes

    mod = _fake_pynvml()

    def unsupported(handle):
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

    mod.nvmlDeviceGetComputeRunningProcesses = unsupported  # and no graphics getter at all
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    assert gpu_processes(NvmlInventory(), [0, 1]) == []
    assert gpu_processes(object(), [0]) == []  # an inventory that cannot tell


def test_simulated_state_file_may_name_the_holders(tmp_path) -> None:
    from model_server.launcher.gpu_memory import GpuProcess

    state = tmp_path / "gpus.json"
    state.write_text(json.dumps({"1": {"used_mib": 300, "pids": [41, 42]}, "2": 7}))
    inv = SimulatedInventory(4, 1000, state)
    assert [r.used_mib for r in inv.read([1, 2])] == [300, 7]
    assert inv.processes([1, 2, 3]) == [GpuProcess(1, 41), GpuProcess(1, 42)]
