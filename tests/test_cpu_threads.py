"""`hardware.cpu_threads`: `auto` resolves by the documented rule for any machine (a pure function, the
core counts injected), a number is honoured and recorded in the plan summary.json stores, and a bad value
stops the run as one line before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _project import compose_cfg, demo_overrides

from xraycls.errors import SettingsError
from xraycls.hardware.plan import PlanError, plan_from_config, resolve_cpu_threads
from xraycls.hardware.threads import apply_cpu_threads, available_cores, idle_cores
from xraycls.training import hardware_plan
from xraycls.training.run import build

BAD_VALUE = r"hardware.cpu_threads must be 'auto' or a positive int, got "


@pytest.mark.parametrize(
    ("cores", "workers", "idle", "processes", "threads"),
    [
        (2, 0, None, 1, 2),  # idle unknown: every core the process may use
        (2, 0, 2.0, 1, 2),  # a quiet 2-core machine: both cores (today's default there)
        (2, 0, 1.0, 1, 1),  # beside one busy process: one thread
        (2, 0, 0.1, 1, 1),  # everything busy: still one
        (2, 0, 1.8, 1, 2),  # a core counts when at least 3/4 idle ...
        (2, 0, 1.7, 1, 1),  # ... not below
        (8, 2, 8.0, 1, 6),  # DataLoader workers take a core each
        (8, 2, 5.0, 1, 5),  # fewer idle cores than left after the workers
        (4, 6, 4.0, 1, 1),  # more workers than cores: at least one
        (16, 1, 16.0, 4, 3),  # DDP on the CPU: 4 processes share the cores, each has a worker
        (16, 0, 8.0, 4, 2),  # ... and the idle cores
    ],
)
def test_auto_takes_the_cores_left_after_workers_and_no_more_than_are_idle(
    cores: int, workers: int, idle: float | None, processes: int, threads: int
) -> None:
    resolved = resolve_cpu_threads(
        "auto", accelerator="cpu", cores=cores, idle=idle, workers=workers, processes=processes
    )
    assert resolved == (threads, "auto")


def test_a_number_is_used_as_given_and_auto_leaves_gpus_to_torch() -> None:
    assert resolve_cpu_threads(3, accelerator="cpu", cores=2, idle=0.0) == (3, "config")
    assert resolve_cpu_threads(3, accelerator="gpu", cores=2) == (3, "config")
    assert resolve_cpu_threads("auto", accelerator="gpu", cores=16, idle=16.0) == (None, "torch")


def test_the_plan_reads_the_data_workers_and_the_injected_machine() -> None:
    config = {"hardware": {"accelerator": "cpu"}, "data": {"batch_size": 16, "num_workers": 2}}
    plan = plan_from_config(config, env={}, cores=8, idle_cores=7.9)
    assert (plan.cpu_threads, plan.cpu_threads_source) == (6, "auto")
    assert plan.to_dict()["cpu_threads"] == 6
    on_gpu = plan_from_config({"hardware": {"accelerator": "gpu"}}, env={}, cores=8)
    assert (on_gpu.cpu_threads, on_gpu.cpu_threads_source) == (None, "torch")


def test_the_machine_readings_are_sane() -> None:
    cores = available_cores()
    idle = idle_cores(interval=0.05)
    assert cores >= 1 and (idle is None or 0.0 <= idle <= cores + 0.01)
    plan = hardware_plan(compose_cfg(["hardware=cpu"], Path("unused")))
    assert 1 <= plan.cpu_threads <= cores and plan.cpu_threads_source == "auto"


@pytest.mark.parametrize("value", ["0", "-1", "x", "true", "2.5"])
def test_a_bad_value_is_refused_as_a_setting_before_any_work(value: str, tmp_path: Path) -> None:
    cfg = compose_cfg(demo_overrides(tmp_path / "data", f"hardware.cpu_threads={value}"), tmp_path / "run")
    with pytest.raises(PlanError, match=BAD_VALUE):
        hardware_plan(cfg)
    with pytest.raises(SettingsError, match=BAD_VALUE) as caught:
        build(cfg)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_a_set_count_is_applied_to_torch_and_recorded_in_the_plan(data_dir: Path, tmp_path: Path) -> None:
    before = torch.get_num_threads()
    try:
        run = build(compose_cfg(demo_overrides(data_dir, "hardware.cpu_threads=3"), tmp_path / "run"))
        assert torch.get_num_threads() == 3
        hardware = run.plan.to_dict()  # summary.json's `hardware` block (run.summarise)
        assert (hardware["cpu_threads"], hardware["cpu_threads_source"]) == (3, "config")
        # Left to torch (None), the plan records the count torch uses.
        left = apply_cpu_threads(plan_from_config({"hardware": {"accelerator": "gpu"}}, env={}, cores=2))
        assert left.cpu_threads == torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_the_demo_records_the_threads_auto_chose(demo_run: tuple[Path, dict, float]) -> None:
    _run_dir, summary, _seconds = demo_run
    hardware = summary["hardware"]
    assert hardware["cpu_threads_source"] == "auto"
    assert 1 <= hardware["cpu_threads"] <= available_cores()
