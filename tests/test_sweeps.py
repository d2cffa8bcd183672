"""Sweeps through the real train.py (subprocesses, tiny 1-epoch demo trials): the Optuna study in optuna.db
continues on relaunch (interrupted trials marked, new job numbers), a failing trial is recorded with its
reason while the sweep goes on, and a grid through submitit_local leaves its trials in trials.csv."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from _project import PROJECT_ROOT

from xraycls.experiment.record import COMPLETE, FAIL, INTERRUPTED, RUNNING, append_trials, trial_row
from xraycls.experiment.report import write_sweep_report

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """paths.data_dir with a 200-image synthetic set at 64 px: a 1-epoch trial takes seconds."""
    from xraycls.data.synthetic import make_synthetic_nih

    data = tmp_path_factory.mktemp("sweep_data")
    make_synthetic_nih(data / "demo" / "raw", 200, size=64, seed=0, min_prevalence=0.08)
    return data


def _sweep(data: Path, sweep: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "train.py",
        "-m",
        "experiment=demo",
        f"paths.data_dir={data}",
        f"paths.runs_dir={data}/runs",
        "trainer.max_epochs=1",
        "plots=false",
        "export_model=false",
        "trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={sweep}",
        *overrides,
    ]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)


def _table(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / "trials.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_optuna_sweep_continues_its_study_and_records_failed_trials(small_data: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "optuna"
    storage = f"sqlite:///{sweep}/optuna.db"
    first = _sweep(small_data, sweep, "hparams_search=optuna", "hydra.sweeper.n_trials=3")
    assert first.returncode == 0, first.stderr[-3000:]
    study = optuna.load_study(study_name="demo", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    table = _table(sweep)
    assert [(r["trial"], r["status"]) for r in table] == [("0", COMPLETE), ("1", COMPLETE), ("2", COMPLETE)]
    for row in table:
        assert float(row["value"]) == pytest.approx(float(row["val_auroc_macro14"]))
        assert (
            row["best_epoch"] == "0"
            and row["test_auroc_macro14"]
            and row["run_dir"].endswith(f"trial_{row['trial']}")
        )
        assert float(row["optim.lr"]) == pytest.approx(study.trials[int(row["trial"])].params["optim.lr"])
    assert len({row["optim.lr"] for row in table}) == 3
    assert write_sweep_report(sweep, tmp_path / "report")["sweep_report.md"].is_file()
    first_summary = (sweep / "trial_0" / "summary.json").stat().st_mtime_ns

    # A sweep killed during trial 3: the study holds it RUNNING, the record too, its folder has no summary.
    killed = study.ask()
    (sweep / "trial_3" / ".hydra").mkdir(parents=True)
    (sweep / "trial_3" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["experiment=demo"]))
    row = trial_row(
        trial=3, status=RUNNING, overrides=["experiment=demo"], seed=0, identity={}, run_dir=sweep / "trial_3"
    )
    append_trials(sweep, [row])
    with pytest.raises(ValueError, match=r"1 unfinished trial\(s\).*trial 3"):
        write_sweep_report(sweep, tmp_path / "report")

    # The same command with n_trials=4 runs one more trial (interrupted ones do not count), as trial 4.
    second = _sweep(small_data, sweep, "hparams_search=optuna", "hydra.sweeper.n_trials=4")
    assert second.returncode == 0, second.stderr[-3000:]
    study = optuna.load_study(study_name="demo", storage=storage)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE"] * 3 + ["FAIL", "COMPLETE"]
    assert study.trials[killed.number].user_attrs["fail_reason"] == INTERRUPTED
    table = _table(sweep)
    assert [(r["trial"], r["status"]) for r in table][3:] == [("3", FAIL), ("4", COMPLETE)]
    assert table[3]["reason"] == INTERRUPTED
    assert (sweep / "trial_4" / "summary.json").is_file()
    assert (sweep / "trial_0" / "summary.json").stat().st_mtime_ns == first_summary  # no folder reused

    # A trial the module refuses fails with its reason; the sweep goes on (max_failure_rate 1.0) and exits 0.
    third = _sweep(small_data, sweep, "hparams_search=optuna", "hydra.sweeper.n_trials=5", "optim.lr=-1")
    assert third.returncode == 0, third.stderr[-3000:]
    table = _table(sweep)
    assert (table[5]["trial"], table[5]["status"]) == ("5", FAIL)
    assert "optim.lr must be a positive number" in table[5]["reason"]
    assert optuna.load_study(study_name="demo", storage=storage).trials[5].state.name == "FAIL"
    text = write_sweep_report(sweep, tmp_path / "report")["sweep_report.md"].read_text()
    assert (
        "trial 5: SettingsError: optim.lr must be a positive number" in text
        and "on the study in optuna.db" in text
    )


def test_grid_sweep_through_submitit_local_records_both_trials(small_data: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "grid"
    result = _sweep(
        small_data, sweep, "hparams_search=lr_sweep", "hydra/launcher=submitit_local", "optim.lr=1e-3,2e-3"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = _table(sweep)
    assert [(r["trial"], r["status"], r["optim.lr"]) for r in table] == [
        ("0", COMPLETE, "0.001"),
        ("1", COMPLETE, "0.002"),
    ]
    # Each trial ran as its own submitit process: a job folder with its result per trial.
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2
    text = write_sweep_report(sweep, tmp_path / "report")["sweep_report.md"].read_text()
    assert "grid sweep; 2 completed, 0 failed" in text and "optim.lr=0.001" in text
