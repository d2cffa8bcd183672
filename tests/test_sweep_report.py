"""The sweep record and report on fixed trial files: rankings against hand-computed means and sample stds
over seeds, test never ranking, the best configuration's line, and one clear error per kind of bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from xraycls.experiment.record import (
    COMPLETE,
    FAIL,
    RUNNING,
    TRIALS_CSV,
    append_trials,
    best_epoch,
    read_trials,
    trial_row,
)
from xraycls.experiment.report import write_sweep_report

EXPERIMENT = {
    "data": {"root": "/data/demo/raw", "split": "official", "split_seed": 0},
    "trainer": {"max_epochs": 2},
}
# (lr, seed, validation value, test value): lr 2e-3 ranks first on validation (0.80, 0.76; a third seed
# failed), while lr 1e-3 has the better TEST numbers, which must not change the ranking.
GRID = [
    ("1e-3", 1, 0.70, 0.90),
    ("1e-3", 2, 0.72, 0.91),
    ("1e-3", 3, 0.74, 0.92),
    ("2e-3", 1, 0.80, 0.60),
    ("2e-3", 2, 0.76, 0.62),
]


def _summary(run_dir: Path, value: float, test: float, epoch: int) -> dict:
    per_finding = {"Atelectasis": value - 0.05, "Cardiomegaly": value + 0.05}
    block = {"loss": 0.2, "auroc_macro14": value, "auroc_macro15": value, "auroc_seed_compat": value}
    return {
        "optimized_metric": "val/auroc_macro14",
        "best_checkpoint": str(run_dir / "checkpoints" / f"best-epoch{epoch:02d}.ckpt"),
        "metrics": {
            "val": {**block, "auroc_per_finding": per_finding},
            "test": {**block, "auroc_macro14": test, "auroc_per_finding": per_finding},
        },
    }


def _trial(
    sweep: Path, number: int, overrides: list[str], status: str, experiment: dict = EXPERIMENT, **kw
) -> dict:
    run_dir = sweep / f"trial_{number}"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**experiment, "seed": kw.get("seed")}))
    summary = kw.pop("summary", None)
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return trial_row(
        trial=number,
        status=status,
        overrides=overrides,
        seed=kw.pop("seed", None),
        identity={},
        run_dir=run_dir,
        swept=["optim.lr"],
        summary=summary,
        **kw,
    )


def _grid_sweep(sweep: Path) -> None:
    rows = []
    for number, (lr, seed, value, test) in enumerate(GRID):
        overrides = [f"optim.lr={lr}", "hparams_search=lr_sweep", "experiment=demo", f"seed={seed}"]
        summary = _summary(sweep / f"trial_{number}", value, test, epoch=number % 2)
        rows.append(
            _trial(sweep, number, overrides, COMPLETE, seed=seed, value=value, summary=summary, seconds=3)
        )
    failed = ["optim.lr=2e-3", "hparams_search=lr_sweep", "experiment=demo", "seed=3"]
    rows.append(_trial(sweep, len(GRID), failed, FAIL, seed=3, reason="RuntimeError: CUDA out of memory"))
    append_trials(sweep, rows)


def test_the_record_keeps_the_latest_line_per_trial_and_its_csv_matches(tmp_path: Path) -> None:
    _grid_sweep(tmp_path)
    rows = read_trials(tmp_path)
    assert [row["trial"] for row in rows] == list(range(len(GRID) + 1))
    with open(tmp_path / TRIALS_CSV, newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["status"] for r in table] == [COMPLETE] * len(GRID) + [FAIL]
    assert table[0]["optim.lr"] == "1e-3" and table[0]["val_auroc/Cardiomegaly"] == str(0.70 + 0.05)
    assert table[3]["best_epoch"] == "1" and table[0]["selected_by"] == "val/auroc_macro14"
    assert table[-1]["reason"] == "RuntimeError: CUDA out of memory"
    assert best_epoch("/x/checkpoints/best-epoch07.ckpt") == 7 and best_epoch(None) is None


def test_report_ranks_configurations_by_validation_mean_over_seeds(tmp_path: Path) -> None:
    sweep, out = tmp_path / "sweep", tmp_path / "report"
    _grid_sweep(sweep)
    written = write_sweep_report(sweep, out)
    assert {"sweep_report.md", "trials.csv", "configurations.csv", "history.png", "per_finding.png"} <= set(
        written
    )
    assert {"importances.png", "parallel.png"} <= set(written)
    for name, path in written.items():
        assert path.is_file() and path.stat().st_size > 0, name

    with open(out / "configurations.csv", newline="") as handle:
        configs = list(csv.DictReader(handle))
    assert [c["configuration"] for c in configs] == ["optim.lr=2e-3", "optim.lr=1e-3"]
    first, second = configs
    assert float(first["val_mean"]) == pytest.approx(0.78)
    assert float(first["val_std"]) == pytest.approx(0.0282843, abs=1e-6)  # sample std of 0.80, 0.76
    assert (first["seeds"], first["failed"], first["trials"]) == ("2", "1", "3 4")
    assert float(second["val_mean"]) == pytest.approx(0.72) and float(second["val_std"]) == pytest.approx(
        0.02
    )
    assert float(first["test_mean (not used for selection)"]) == pytest.approx(0.61)

    with open(out / "trials.csv", newline="") as handle:
        ranked = list(csv.DictReader(handle))
    assert [(r["rank"], r["trial"]) for r in ranked] == [
        ("1", "3"),
        ("1", "4"),
        ("2", "0"),
        ("2", "1"),
        ("2", "2"),
        ("", "5"),
    ]

    text = (out / "sweep_report.md").read_text()
    assert "0.7800 ± 0.0283" in text and "0.7200 ± 0.0200" in text
    assert "python train.py -m hparams_search=repeat experiment=demo optim.lr=2e-3 seed=1,2,3" in text
    assert "trial 5: RuntimeError: CUDA out of memory" in text
    assert "MeanDecreaseImpurity" in text and "completed trials of the record" in text
    assert "- `optim.lr`: 1.000" in text  # the only parameter that varies


def test_report_refuses_an_empty_folder_and_its_own_sweep_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=rf"{tmp_path}: no trials"):
        write_sweep_report(tmp_path, tmp_path / "report")
    _grid_sweep(tmp_path)
    with pytest.raises(ValueError, match="would replace the sweep's record"):
        write_sweep_report(tmp_path, tmp_path)


def test_report_refuses_trials_of_different_experiments(tmp_path: Path) -> None:
    _grid_sweep(tmp_path)
    longer = {**EXPERIMENT, "trainer": {"max_epochs": 3}}
    overrides = ["optim.lr=5e-3", "experiment=demo", "seed=1", "trainer.max_epochs=3"]
    summary = _summary(tmp_path / "trial_9", 0.9, 0.9, epoch=2)
    row = _trial(tmp_path, 9, overrides, COMPLETE, experiment=longer, seed=1, value=0.9, summary=summary)
    append_trials(tmp_path, [row])
    with pytest.raises(ValueError, match=r"different experiments.*trials \[9\].*max_epochs\": 3"):
        write_sweep_report(tmp_path, tmp_path / "report")


def test_report_lists_unfinished_trials_instead_of_dropping_them(tmp_path: Path) -> None:
    _grid_sweep(tmp_path)
    overrides = ["optim.lr=5e-3", "experiment=demo", "seed=1"]
    append_trials(tmp_path, [_trial(tmp_path, 7, overrides, RUNNING, seed=1)])
    orphan = tmp_path / "trial_8" / ".hydra"  # a trial folder the record never saw, without summary.json
    orphan.mkdir(parents=True)
    (orphan / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    with pytest.raises(ValueError, match=r"2 unfinished trial\(s\).*trial 7 .*trial_7.*trial_8"):
        write_sweep_report(tmp_path, tmp_path / "report")
    write_sweep_report(tmp_path, tmp_path / "report", allow_unfinished=True)
    text = (tmp_path / "report" / "sweep_report.md").read_text()
    assert "## Unfinished trials (left out)" in text and "trial_7" in text and "trial_8" in text
