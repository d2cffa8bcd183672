"""experiments/benchmarks/gpu_check.sh: the real mode refuses without CUDA and writes nothing; the dry mode
runs every step on the CPU and writes one result, with every section, outside experiments/results/."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from _project import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "experiments" / "benchmarks" / "gpu_check.sh"
DRIVER = PROJECT_ROOT / "experiments" / "benchmarks" / "gpu_check.py"
RESULTS = PROJECT_ROOT / "experiments" / "results"
SECTIONS = (
    "## Setting",
    "## Throughput: cache-fed Lightning vs bare timm + torch.compile (same process)",
    "## Compile fixed cost",
    "## xraycls predict --device cpu",
    "## Peak GPU memory",
    "## Raw results (JSON)",
)


def _driver() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check_driver", DRIVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results() -> set[str]:
    return {path.name for path in RESULTS.iterdir()}


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    return {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(scratch), **extra}


@pytest.fixture
def no_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal is for machines without it")


@pytest.mark.usefixtures("no_cuda")
def test_real_mode_refuses_without_cuda_and_writes_nothing(tmp_path: Path) -> None:
    before = _results()
    out = tmp_path / "result.md"
    done = subprocess.run(
        ["bash", str(SCRIPT)], env=_env(tmp_path, GPU_CHECK_OUT=str(out)), capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "nothing written" in lines[0]
    assert not out.exists() and _results() == before
    assert not any((tmp_path / "tmp").iterdir())  # refused before making its scratch folder


@pytest.mark.usefixtures("no_cuda")
def test_the_driver_refuses_too(tmp_path: Path) -> None:
    out = tmp_path / "result.md"
    command = [sys.executable, str(DRIVER), "run", "--workdir", str(tmp_path), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2 and "no CUDA device" in done.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_dry_run_never_writes_under_results(tmp_path: Path) -> None:
    out = RESULTS / "gpu_check_dry_run_test.md"
    command = [sys.executable, str(DRIVER), "run", "--dry-run", "--workdir", str(tmp_path), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2 and "never writes under" in done.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_modules_are_named_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    driver = _driver()
    monkeypatch.setattr(driver, "REQUIRED_MODULES", ("torch", "no_such_module_a", "no_such_module_b"))
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "modules"])
    assert driver.main() == 3
    assert capsys.readouterr().err == "gpu_check: missing modules: no_such_module_a, no_such_module_b\n"
    monkeypatch.setattr(driver, "REQUIRED_MODULES", ("torch",))
    assert driver.main() == 0 and capsys.readouterr().err == ""


def test_the_result_is_named_by_card_and_date() -> None:
    path = _driver().result_path("NVIDIA H200", "2026-12-01")
    assert path == RESULTS / "gpu_nvidia_h200_2026-12-01.md"


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_one_marked_result(tmp_path: Path) -> None:
    before = _results()
    out = tmp_path / "dry.md"
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"],
        env=_env(tmp_path, GPU_CHECK_OUT=str(out)),
        capture_output=True,
        text=True,
        timeout=580,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# GPU check: CPU (dry run), ") and "**DRY RUN: CPU" in text
    for section in SECTIONS:
        assert section in text, section
    report = json.loads(re.findall(r"```json\n(.*?)\n```", text, flags=re.DOTALL)[-1])
    assert report["dry_run"] is True and report["short_run"]["peak_memory"] is None
    assert set(report["throughput"]["results"]) == {"bare", "lightning_cache"}
    for kind in ("train", "eval"):
        assert report["throughput"]["results"]["lightning_cache"][kind]["images_per_s"] > 0
    assert [run["rows"] for run in report["predict"]["runs"]] == list(report["settings"]["predict_images"])
    assert report["data"]["images"] == report["settings"]["synth_images"]
    assert _results() == before  # nothing under experiments/results/
    assert not list((tmp_path / "tmp").glob("xraycls-gpu-check-*"))  # its scratch folder is gone
