"""A wrong setting through the real `train.py`: one line on stderr, exit 2, no traceback, no run folder left.

Each case runs `python train.py ...` as a user would; they run side by side (each start imports torch).
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _project import PROJECT_ROOT

# (overrides after the demo's, the start of the one line train.py must print)
REFUSED = {
    "negative lr": (["optim.lr=-1"], "optim.lr must be a positive number, got -1"),
    "unknown split": (["data.split=foo"], "unknown split 'foo'"),
    "typo'd optimizer key": (["+optim.foo=1"], "unknown setting optim.foo: optim takes betas,"),
    "unknown top-level key": (["+foo=1"], "unknown setting foo: the top level takes"),
    "unknown data key": (["+data.foo=1"], "unknown setting data.foo: data takes"),
    "no epochs": (["trainer.max_epochs=0"], "trainer.max_epochs=0: this run would train no step"),
    "IPU layout of another model": (["hardware=vpod4"], "hardware.layers_per_ipu=[3, 3, 3, 3] places 12"),
    "IPU without PopTorch": (["hardware=vpod4", "hardware.layers_per_ipu=[2,2,1,1]"], "PopTorch"),
    "no unfinished run": (["ckpt_path=last"], "ckpt_path=last: no unfinished run of task 'demo'"),
    "missing checkpoint": (["ckpt_path=/nonexistent.ckpt"], "ckpt_path='/nonexistent.ckpt': no such"),
    "unknown experiment": (["experiment=nope"], "In 'config': Could not find 'experiment/nope'"),
    "key without +": (["foo=1"], "Could not override 'foo'."),
}


def train(
    runs: Path, data_dir: Path, *overrides: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(PROJECT_ROOT / "train.py"),
        "experiment=demo",
        f"paths.data_dir={data_dir}",
        f"paths.runs_dir={runs}",
        "trainer.enable_progress_bar=false",
        *overrides,
    ]
    inherited = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    env = {**inherited, "PYTHONPATH": str(PROJECT_ROOT), **(env or {})}
    return subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def refused(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Every case of REFUSED, each in its own runs folder: (result, runs folder)."""
    root = tmp_path_factory.mktemp("refused")

    def one(name: str) -> tuple[str, subprocess.CompletedProcess, Path]:
        runs = root / name.replace(" ", "_").replace("'", "")
        return name, train(runs, data_dir, *REFUSED[name][0]), runs

    with ThreadPoolExecutor(max_workers=4) as pool:
        return {name: (result, runs) for name, result, runs in pool.map(one, REFUSED)}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_wrong_setting_is_one_line_exit_2_and_leaves_no_run_folder(refused: dict, case: str) -> None:
    result, runs = refused[case]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert lines[-1].startswith("train.py: error: "), lines[-3:]
    assert REFUSED[case][1] in lines[-1], lines[-1]
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr
    assert "Error executing job" not in result.stderr  # Hydra's own line, before ours
    left = [path for path in runs.rglob("*")] if runs.exists() else []
    assert not left, f"a refused run left {left}"


def test_hydra_full_error_shows_the_traceback(data_dir: Path, tmp_path: Path) -> None:
    result = train(tmp_path / "runs", data_dir, "optim.lr=-1", env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr
    assert "optim.lr must be a positive number" in result.stderr
