"""A finished sweep read back from disk, checked, and grouped into configurations ranked by validation.

The trials come from the record (trials.jsonl, see xraycls.experiment.record); a sweep without one (a plain
`python train.py -m ...`) is read from its trial folders (.hydra/overrides.yaml, config.yaml, summary.json).
A configuration is a trial's overrides minus `seed` (and the `hparams_search` choice); its score is the mean
± sample std of the objective over its completed seeds. Validation ranks; test is carried, never used.
"""

from __future__ import annotations

import json
import shlex
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from xraycls.experiment.record import (
    COMPLETE,
    FAIL,
    RUNNING,
    experiment_identity,
    parse_overrides,
    read_trials,
    trial_row,
)

__all__ = ["Configuration", "Sweep", "load_sweep", "rank_configurations", "config_key"]

_NOT_CONFIG = ("seed", "hparams_search")


@dataclass
class Configuration:
    """One configuration of a sweep: its trials (seeds) and their objective."""

    key: tuple[str, ...]  # sorted overrides minus seed
    label: str  # the overrides that vary across the sweep
    trials: list[dict[str, Any]]
    failed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def values(self) -> list[float]:
        return [row["value"] for row in self.trials]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def test_values(self) -> list[float]:
        return [row["test_auroc_macro14"] for row in self.trials if row.get("test_auroc_macro14") is not None]

    def command(self) -> str:
        """The line that repeats this configuration over seeds (the record and report come with it)."""
        return " ".join(
            ["python train.py -m hparams_search=repeat", *map(shlex.quote, self.key), "seed=1,2,3"]
        )


@dataclass
class Sweep:
    folder: Path
    kind: str  # "optuna" (optuna.db present) or "grid"
    trials: list[dict[str, Any]]  # finished: COMPLETE and FAIL
    unfinished: list[dict[str, Any]]

    @property
    def complete(self) -> list[dict[str, Any]]:
        return [row for row in self.trials if row["status"] == COMPLETE]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [row for row in self.trials if row["status"] == FAIL]

    def varying(self) -> list[str]:
        """Override keys (minus seed) whose values differ between completed trials, in order of appearance."""
        configs = [_config_overrides(row) for row in self.complete]
        keys = list(dict.fromkeys(key for config in configs for key in config))
        return [key for key in keys if len({config.get(key) for config in configs}) > 1]


def config_key(row: dict[str, Any]) -> tuple[str, ...]:
    return tuple(sorted(f"{key}={value}" for key, value in _config_overrides(row).items()))


def load_sweep(sweep_dir: Path, *, allow_unfinished: bool = False) -> Sweep:
    """The sweep in `sweep_dir`, or ValueError naming the folder and what is wrong with it."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ValueError(f"{sweep_dir}: no such sweep folder")
    rows = read_trials(sweep_dir)
    folders = _trial_folders(sweep_dir)
    if not rows:
        rows = [_row_from_folder(folder) for folder in folders]
    if not rows:
        raise ValueError(
            f"{sweep_dir}: no trials (no trials.jsonl and no trial folder with .hydra/overrides.yaml)"
        )
    finished = [row for row in rows if row["status"] in (COMPLETE, FAIL)]
    finished_dirs = {str(Path(row["run_dir"]).resolve()) for row in finished if row.get("run_dir")}
    unfinished = [row for row in rows if row["status"] not in (COMPLETE, FAIL)]
    unfinished_dirs = {str(Path(row["run_dir"]).resolve()) for row in unfinished if row.get("run_dir")}
    for folder in folders:
        resolved = str(folder.resolve())
        if resolved not in finished_dirs | unfinished_dirs and not (folder / "summary.json").is_file():
            unfinished.append({"trial": _job_num(folder), "status": RUNNING, "run_dir": str(folder)})
    if unfinished and not allow_unfinished:
        listed = "; ".join(
            f"trial {row['trial']} ({row.get('run_dir') or 'no folder'})" for row in unfinished
        )
        raise ValueError(
            f"{sweep_dir}: {len(unfinished)} unfinished trial(s), RUNNING in the record or a trial folder "
            f"without summary.json: {listed}. Wait for the sweep, continue it (the same command with "
            "hydra.sweep.dir=<this folder>), or report without them (allow_unfinished=True)"
        )
    if not any(row["status"] == COMPLETE for row in finished):
        reasons = "; ".join(f"trial {row['trial']}: {row.get('reason')}" for row in finished)
        raise ValueError(f"{sweep_dir}: no completed trial to rank ({reasons or 'none finished'})")
    _check_one_experiment(sweep_dir, finished)
    kind = "optuna" if (sweep_dir / "optuna.db").is_file() else "grid"
    return Sweep(sweep_dir, kind, finished, unfinished)


def rank_configurations(sweep: Sweep) -> list[Configuration]:
    """Configurations with a completed trial, best mean objective first (ties: more seeds, earlier trial)."""
    varying = sweep.varying()
    groups: dict[tuple[str, ...], Configuration] = {}
    for row in sweep.trials:
        key = config_key(row)
        if key not in groups:
            config = _config_overrides(row)
            label = " ".join(f"{name}={config[name]}" for name in varying if name in config)
            groups[key] = Configuration(key, label or "(one configuration)", [])
        (groups[key].trials if row["status"] == COMPLETE else groups[key].failed).append(row)
    ranked = [config for config in groups.values() if config.trials]
    ranked.sort(key=lambda c: (-c.mean, -len(c.trials), min(row["trial"] for row in c.trials)))
    return ranked


def _config_overrides(row: dict[str, Any]) -> dict[str, str]:
    parsed = parse_overrides(row.get("overrides") or [])
    return {key: value for key, value in parsed.items() if key not in _NOT_CONFIG}


def _trial_folders(sweep_dir: Path) -> list[Path]:
    return sorted(path.parent.parent for path in sweep_dir.glob("**/.hydra/overrides.yaml"))


def _job_num(folder: Path) -> int | None:
    hydra_yaml = folder / ".hydra" / "hydra.yaml"
    num = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.job.num") if hydra_yaml.is_file() else None
    return None if num is None else int(num)


def _row_from_folder(folder: Path) -> dict[str, Any]:
    """A record line rebuilt from a trial folder (sweeps run without the TrialRecord callback)."""
    overrides = [str(item) for item in OmegaConf.load(folder / ".hydra" / "overrides.yaml")]
    config = _run_config(folder)
    hydra_yaml = folder / ".hydra" / "hydra.yaml"
    swept = (
        OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.sweeper.params") if hydra_yaml.is_file() else None
    )
    summary_path = folder / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
    value = None
    if summary is not None:
        stage, _, name = str(summary.get("optimized_metric", "val/auroc_macro14")).partition("/")
        value = (summary["metrics"].get(stage) or {}).get(name)
    return trial_row(
        trial=_job_num(folder) or 0,
        status=COMPLETE if value is not None else (FAIL if summary is not None else RUNNING),
        reason=None if value is not None or summary is None else "the objective was not measured",
        overrides=overrides,
        seed=None if config is None else config.get("seed"),
        identity={} if config is None else experiment_identity(config),
        run_dir=folder,
        swept=list(swept or {}),
        value=value,
        summary=summary,
    )


def _run_config(folder: Path) -> Any:
    for path in (folder / "config.yaml", folder / ".hydra" / "config.yaml"):
        if path.is_file():
            return OmegaConf.load(path)
    return None


def _check_one_experiment(sweep_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Every trial must share the data, split and epochs (read from its run folder's config.yaml)."""
    by_identity: dict[str, list[int]] = {}
    for row in rows:
        config = _run_config(Path(row["run_dir"])) if row.get("run_dir") else None
        identity = experiment_identity(config) if config is not None else row.get("experiment") or {}
        if not identity:  # e.g. a trial interrupted before its job started: nothing to compare
            continue
        by_identity.setdefault(json.dumps(identity, sort_keys=True, default=str), []).append(row["trial"])
    if len(by_identity) > 1:
        parts = [f"trials {trials}: {text}" for text, trials in by_identity.items()]
        raise ValueError(
            f"{sweep_dir}: trials of different experiments (data, split or epochs differ), which one "
            f"ranking cannot compare; report them as separate sweeps. {' | '.join(parts)}"
        )
