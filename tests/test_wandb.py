"""W&B for sweeps, with the real wandb package offline (no network): groups, job types and tags, best-value
summaries, the per-epoch per-finding table, test ROC curves, run ids that survive a rerun, the model
artifact, and experiments/wandb_sweep.yaml against the real Hydra config. What wandb wrote is read back
from its offline run log (tests/_wandb_records.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from _project import CONF_DIR, PROJECT_ROOT, compose_cfg
from _wandb_records import read_offline_run

from xraycls.findings import LABELS
from xraycls.training.wandb_logger import RUN_ID_FILE, make_wandb_logger
from xraycls.training.wandb_media import EPOCH_TABLE_COLUMNS, ROC_GRID_POINTS, model_artifact

SWEEP_YAML = PROJECT_ROOT / "experiments" / "wandb_sweep.yaml"


def _wandb_env(root: Path) -> dict[str, str]:
    """Offline, quiet, and every wandb folder outside the run directory inside `root`."""
    return {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(root / "wandb_dir"),
        "WANDB_CACHE_DIR": str(root / "wandb_cache"),
        "WANDB_CONFIG_DIR": str(root / "wandb_config"),
        "WANDB_DATA_DIR": str(root / "wandb_data"),
    }


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in _wandb_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    for key in ("WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_SWEEP_ID"):
        monkeypatch.delenv(key, raising=False)


def _offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def _table(run_dir: Path, key: str) -> dict:
    (path,) = (run_dir / "files" / "media" / "table").glob(f"{key}_*.table.json")
    return json.loads(path.read_text())


def _epoch_metrics(epoch: int, macro: float) -> dict[str, float]:
    per_finding = {f"val/auroc/{label}": macro + k / 1000 for k, label in enumerate(LABELS)}
    return {"epoch": epoch, "val/auroc_macro14": macro, "val/loss": 1 - macro, **per_finding}


def test_the_summary_keeps_the_best_epoch_and_the_table_each_trained_epoch(
    tmp_path: Path, offline: None
) -> None:
    logger = make_wandb_logger(
        save_dir=str(tmp_path), name="unit", job_type="demo", context_tags={"hardware": "cpu"}
    )
    macro = [0.6, 0.8, 0.7]
    for epoch, value in enumerate(macro):
        logger.log_metrics(_epoch_metrics(epoch, value), step=10 * epoch)
        logger.log_metrics({"epoch": epoch, "train/loss_epoch": 0.3}, step=10 * epoch)
    logger.log_metrics(_epoch_metrics(3, 0.8), step=30)  # the best checkpoint validated after fit
    rng = np.random.default_rng(0)
    labels = (rng.random((60, len(LABELS))) < 0.3).astype(np.float32)
    labels[:, -1] = 0  # one label without positives: no ROC curve for it
    probs = rng.random((60, len(LABELS))).astype(np.float32)
    val = {"auroc_macro14": 0.8, "loss": 0.2, "auroc_per_finding": dict.fromkeys(LABELS, 0.5)}
    summary = {
        "metrics": {"val": val, "test": None},
        "labels": list(LABELS),
        "hardware": {"accelerator": "cpu"},
    }
    logger.log_run_summary(summary, test_outputs=(probs, labels))
    assert logger.summary_entries() == {"wandb_run_id": logger.version}
    logger.close()

    (run_dir,) = _offline_runs(tmp_path)
    run = read_offline_run(run_dir)
    assert (run.run_id, run.job_type, run.group) == (logger.version, "demo", "")
    assert run.tags == ["hardware:cpu", "accelerator:cpu"]
    best = run.metrics["val/auroc_macro14"]
    assert best.step_metric == "epoch" and best.summary.max
    assert run.metrics["val/loss"].summary.min and run.metrics["val/auroc/Hernia"].step_metric == "epoch"
    # During the run the summary holds the best so far ({"max": ...}); it ends with summary.json's value.
    running = [row for row in run.history if "val/auroc_macro14" in row]
    assert [row["val/auroc_macro14"] for row in running] == [*macro, 0.8]
    assert run.summary["val/auroc_macro14"] == 0.8 != macro[-1]
    table = _table(run_dir, "val/auroc_by_epoch")
    assert table["columns"] == EPOCH_TABLE_COLUMNS
    assert [row[:2] for row in table["data"]] == [[epoch, label] for epoch in range(3) for label in LABELS]
    assert table["data"][len(LABELS) + 2][2] == pytest.approx(0.8 + 2 / 1000)
    roc = _table(run_dir, "test/roc_curves_table")
    assert roc["columns"] == [
        "step",
        "lineKey",
        "lineVal",
    ]  # false positive rate, finding, true positive rate
    assert {row[1] for row in roc["data"]} == set(LABELS[:-1])
    assert len(roc["data"]) == ROC_GRID_POINTS * (len(LABELS) - 1)


def test_a_rerun_of_the_run_directory_keeps_its_run_id_and_others_never_share_a_folder(
    tmp_path: Path, offline: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, other = tmp_path / "run", tmp_path / "other"
    ids = []
    for save_dir in (first, other, first):  # within a second or two: the folders differ by run id
        logger = make_wandb_logger(save_dir=str(save_dir))
        logger.log_metrics({"epoch": 0, "val/auroc_macro14": 0.5})
        ids.append(logger.version)
        logger.close()
    assert ids[0] == ids[2] != ids[1]
    assert (first / RUN_ID_FILE).read_text().strip() == ids[0]
    # Offline, the rerun is a second folder with the same id: `wandb sync` uploads both into one run.
    # In the same second wandb adds -1, -2... to the folder's name, so even then no folder is shared.
    reruns = _offline_runs(first)
    assert len(reruns) == 2 and all(re.search(rf"-{ids[0]}(-\d+)?$", path.name) for path in reruns)
    assert {read_offline_run(path).run_id for path in reruns} == {ids[0]}
    assert all(read_offline_run(path).resume for path in reruns)
    assert [path.name.endswith(f"-{ids[1]}") for path in _offline_runs(other)] == [True]
    # A sweep agent's run id wins, and is what the run directory keeps.
    monkeypatch.setenv("WANDB_RUN_ID", "agentrun1")
    agent = tmp_path / "agent"
    assert make_wandb_logger(save_dir=str(agent)).version == "agentrun1"
    assert (agent / RUN_ID_FILE).read_text().strip() == "agentrun1"


def test_the_model_artifact_holds_every_file_of_the_bundle(tmp_path: Path, offline: None) -> None:
    bundle = tmp_path / "model"
    bundle.mkdir()
    for name in ("model.safetensors", "config.json", "labels.json"):
        (bundle / name).write_text(name)
    artifact = model_artifact(bundle, "abc123", {"val/auroc_macro14": 0.8})
    assert (artifact.name, artifact.type) == ("model-abc123", "model")
    assert sorted(artifact.manifest.entries) == ["config.json", "labels.json", "model.safetensors"]
    assert artifact.metadata == {"val/auroc_macro14": 0.8}


def _optuna_ranges() -> dict[str, tuple[float, float, bool]]:
    """conf/hparams_search/optuna.yaml's params as {name: (low, high, log)}."""
    params = yaml.safe_load((CONF_DIR / "hparams_search" / "optuna.yaml").read_text())["hydra"]["sweeper"][
        "params"
    ]
    ranges = {}
    for name, text in params.items():
        low, high = re.search(r"interval\(([^,]+),\s*([^)]+)\)", text).groups()
        ranges[name] = (float(low), float(high), "tag(log" in text)
    return ranges


def test_the_wandb_sweep_config_matches_optuna_and_drives_the_real_hydra_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    sweep = yaml.safe_load(SWEEP_YAML.read_text())
    assert sweep["program"] == "train.py" and sweep["method"] in ("bayes", "random")
    assert sweep["metric"] == {"name": "val/auroc_macro14", "goal": "maximize"}
    assert sweep["command"][:3] == ["${env}", "${interpreter}", "${program}"]
    assert sweep["command"][-1] == "${args_no_hyphens}" and "logger=wandb" in sweep["command"]
    params = sweep["parameters"]
    for name, (low, high, log) in _optuna_ranges().items():
        spec = params[name]
        assert (spec["min"], spec["max"]) == (low, high), name
        assert spec["distribution"] == ("log_uniform_values" if log else "uniform"), name
    fixed = [item for item in sweep["command"][3:-1]]
    for end in ("min", "max"):  # what the agent passes: name=value per parameter
        values = {name: {"value": spec.get("value", spec.get(end))} for name, spec in params.items()}
        overrides = create_sweep_command_args({"args": values})["args_no_hyphens"]
        OverridesParser.create().parse_overrides([*fixed, *overrides])  # every argument is Hydra syntax
        monkeypatch.setenv("WANDB_SWEEP_ID", "sweep9")
        monkeypatch.setenv("WANDB_RUN_ID", "run42")
        cfg = compose_cfg([*overrides, "logger=wandb", "model.weights=none"], tmp_path)
        for name, spec in params.items():
            if name != "experiment":
                assert OmegaConf.select(cfg, name) == pytest.approx(spec[end]), name
        assert cfg.task_name == "official_split" and "wandb" in cfg.logger
    run_dir = next(item for item in fixed if item.startswith("hydra.run.dir="))
    assert run_dir.endswith("/${task_name}/wandb_${oc.env:WANDB_SWEEP_ID}/${oc.env:WANDB_RUN_ID}")


@pytest.mark.slow
def test_a_two_job_multirun_is_one_wandb_group_with_best_summaries_and_tables(
    data_dir: Path, tmp_path: Path
) -> None:
    runs_dir = tmp_path / "runs"
    sweep = runs_dir / "demo" / "seeds"
    command = [
        sys.executable,
        str(PROJECT_ROOT / "train.py"),
        "-m",
        "experiment=demo",
        f"paths.data_dir={data_dir}",
        f"paths.runs_dir={runs_dir}",
        "logger=wandb",
        "seed=1,2",
        "trainer.max_epochs=3",
        "plots=false",
        "export_model=false",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **_wandb_env(tmp_path)}
    for key in ("WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_SWEEP_ID"):
        env.pop(key, None)
    result = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    ids, folders = [], []
    for job in ("0", "1"):
        job_dir = sweep / job
        summary = json.loads((job_dir / "summary.json").read_text())
        (folder,) = _offline_runs(job_dir)
        run = read_offline_run(folder)
        assert run.run_id == summary["wandb_run_id"] == (job_dir / RUN_ID_FILE).read_text().strip()
        assert folder.name.endswith(f"-{run.run_id}")
        ids.append(run.run_id)
        folders.append(folder.resolve())
        assert (run.group, run.job_type, run.name) == ("demo/seeds", "demo", f"demo/{job}")
        assert {"experiment:demo", "hardware:cpu", "model:test_vit", "accelerator:cpu"} <= set(run.tags)
        # History: one validation per trained epoch, then the best checkpoint's again after fit.
        fitted = [row for row in run.history if "val/auroc_macro14" in row and row["epoch"] < 3]
        assert [row["epoch"] for row in fitted] == [0, 1, 2]
        best = max(row["val/auroc_macro14"] for row in fitted)
        assert run.summary["val/auroc_macro14"] == pytest.approx(best)
        assert summary["metrics"]["val"]["auroc_macro14"] == pytest.approx(best)
        assert run.summary["test/auroc_macro14"] == pytest.approx(summary["metrics"]["test"]["auroc_macro14"])
        table = _table(folder, "val/auroc_by_epoch")
        expected = [[row["epoch"], label, row[f"val/auroc/{label}"]] for row in fitted for label in LABELS]
        assert [row[:2] for row in table["data"]] == [row[:2] for row in expected]
        assert np.allclose([row[2] for row in table["data"]], [row[2] for row in expected], equal_nan=True)
        assert len(_table(folder, "test/roc_curves_table")["data"]) % ROC_GRID_POINTS == 0
    assert ids[0] != ids[1] and folders[0] != folders[1]
