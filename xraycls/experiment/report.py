"""The sweep report, offline from the files of a grid or Optuna sweep: `write_sweep_report(sweep, out)`.

Writes sweep_report.md (ranking by configuration, mean ± sample std over seeds; failed and unfinished trials;
parameter importances with the method used; the best configuration as a line to paste), trials.csv (every
trial, ranked), configurations.csv and PNG charts: history.png, importances.png, parallel.png and
per_finding.png. Validation chooses; test is shown beside it and never used to rank.
Importances: optuna's MeanDecreaseImpurity evaluator (a seeded random forest) on the study in optuna.db,
or on an in-memory study built from the completed trials of a grid. (optuna 2.10's default fANOVA
evaluator fails on NumPy 2.)
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from xraycls.experiment import _charts
from xraycls.experiment._files import write_text_atomic
from xraycls.experiment.record import csv_columns, csv_text, parse_overrides
from xraycls.experiment.sweep import Configuration, Sweep, load_sweep, rank_configurations

__all__ = ["write_sweep_report", "parameter_importances", "IMPORTANCE_SEED"]

log = logging.getLogger(__name__)

IMPORTANCE_SEED = 0


def write_sweep_report(sweep_dir: Path, out_dir: Path, *, allow_unfinished: bool = False) -> dict[str, Path]:
    """Write the report of `sweep_dir` into `out_dir`; returns {name: path} of every file written.

    Raises ValueError naming the folder and the problem: no trials, no completed trial, trials of different
    experiments, or unfinished trials (listed; `allow_unfinished=True` reports without them).
    """
    sweep_dir, out_dir = Path(sweep_dir), Path(out_dir)
    if out_dir.resolve() == sweep_dir.resolve():
        raise ValueError(f"{out_dir}: the report's trials.csv would replace the sweep's record; pick another")
    sweep = load_sweep(sweep_dir, allow_unfinished=allow_unfinished)
    ranked = rank_configurations(sweep)
    objective = next((row["selected_by"] for row in sweep.complete if row.get("selected_by")), "objective")
    importances, method = parameter_importances(sweep)
    written = {
        "trials.csv": write_text_atomic(out_dir / "trials.csv", _ranked_trials_csv(sweep, ranked)),
        "configurations.csv": write_text_atomic(out_dir / "configurations.csv", _configurations_csv(ranked)),
        "history.png": _charts.plot_history(sweep.trials, objective, out_dir / "history.png"),
        "per_finding.png": _charts.plot_per_finding(sweep.complete, out_dir / "per_finding.png"),
    }
    if importances:
        written["importances.png"] = _charts.plot_importances(
            importances, method, out_dir / "importances.png"
        )
    params = _param_columns(sweep)
    if params:
        written["parallel.png"] = _charts.plot_parallel(
            sweep.complete, params, objective, out_dir / "parallel.png"
        )
    text = _markdown(sweep, ranked, objective, importances, method, written)
    written["sweep_report.md"] = write_text_atomic(out_dir / "sweep_report.md", text)
    return written


def parameter_importances(sweep: Sweep) -> tuple[dict[str, float], str]:
    """({parameter: importance}, method); empty with the reason as method when they cannot be computed."""
    import optuna

    evaluator = optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=IMPORTANCE_SEED)
    method = f"optuna MeanDecreaseImpurity (random forest, seed {IMPORTANCE_SEED})"
    try:
        if sweep.kind == "optuna":
            study = optuna.load_study(study_name=_study_name(sweep.folder), storage=_storage(sweep.folder))
            source = "the study in optuna.db"
        else:
            study = _study_from_trials(sweep)
            source = "the completed trials of the record"
        if sum(trial.state == optuna.trial.TrialState.COMPLETE for trial in study.trials) < 2:
            return {}, "not available: fewer than 2 completed trials"
        if not study.best_trial.params:
            return {}, "not available: no parameter varies between trials"
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError, KeyError) as error:
        return {}, f"not available: {error}"
    return {k: float(v) for k, v in importances.items()}, f"{method} on {source}"


def _storage(folder: Path) -> str:
    return f"sqlite:///{(folder / 'optuna.db').resolve()}"


def _study_name(folder: Path) -> str:
    """The study of this sweep: the name in multirun.yaml, else the only study in optuna.db."""
    import optuna

    names = [summary.study_name for summary in optuna.study.get_all_study_summaries(storage=_storage(folder))]
    multirun = folder / "multirun.yaml"
    if multirun.is_file():
        name = OmegaConf.select(OmegaConf.load(multirun), "hydra.sweeper.study_name", default=None)
        if name in names:
            return str(name)
    if len(names) != 1:
        raise ValueError(f"{folder / 'optuna.db'} holds studies {names}; multirun.yaml names none of them")
    return names[0]


def _study_from_trials(sweep: Sweep) -> Any:
    """An in-memory optuna study of the completed trials over the overrides that vary (a grid sweep)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, UniformDistribution

    params = _param_columns(sweep)
    distributions: dict[str, Any] = {}
    for name, column in params.items():
        numbers = [_number(value) for value in column]
        if all(number is not None for number in numbers):
            distributions[name] = UniformDistribution(min(numbers), max(numbers))
        else:
            distributions[name] = CategoricalDistribution(sorted({str(value) for value in column}))
    study = optuna.create_study(direction="maximize")
    with warnings.catch_warnings():  # add_trial and create_trial are "experimental" in optuna 2.10
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for i, row in enumerate(sweep.complete):
            values: dict[str, Any] = {}
            for name, column in params.items():
                categorical = isinstance(distributions[name], CategoricalDistribution)
                values[name] = str(column[i]) if categorical else float(column[i])
            study.add_trial(
                optuna.trial.create_trial(params=values, distributions=distributions, value=row["value"])
            )
    return study


def _param_columns(sweep: Sweep) -> dict[str, list[Any]]:
    """{override key: its value per completed trial} for the keys that vary (missing: 'unset')."""
    keys = sweep.varying()
    rows = [parse_overrides(row.get("overrides") or []) for row in sweep.complete]
    columns = {key: [row.get(key, "unset") for row in rows] for key in keys}
    return {key: column for key, column in columns.items() if len(set(column)) > 1}


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _fmt(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    import statistics

    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _ranked_trials_csv(sweep: Sweep, ranked: list[Configuration]) -> str:
    rows: list[dict[str, Any]] = []
    for rank, config in enumerate(ranked, start=1):
        for row in sorted(config.trials, key=lambda r: (r.get("seed") is None, r.get("seed"), r["trial"])):
            rows.append({**row, "rank": rank, "configuration": config.label})
    rows += [{**row, "rank": None, "configuration": None} for row in sweep.failed]
    columns = ["rank", "configuration", *csv_columns(rows)]
    return csv_text(rows, columns)


def _configurations_csv(ranked: list[Configuration]) -> str:
    rows = []
    for rank, config in enumerate(ranked, start=1):
        test_mean, test_std = _mean_std(config.test_values())
        rows.append(
            {
                "rank": rank,
                "configuration": config.label,
                "seeds": len(config.trials),
                "failed": len(config.failed),
                "val_mean": config.mean,
                "val_std": config.std,
                "test_mean (not used for selection)": test_mean,
                "test_std (not used for selection)": test_std,
                "trials": " ".join(str(row["trial"]) for row in config.trials),
                "command": config.command(),
            }
        )
    return csv_text(rows, list(rows[0]))


def _markdown(
    sweep: Sweep,
    ranked: list[Configuration],
    objective: str,
    importances: dict[str, float],
    method: str,
    written: dict[str, Path],
) -> str:
    best = ranked[0]
    identity = next((row.get("experiment") for row in sweep.trials if row.get("experiment")), {}) or {}
    lines = [
        f"# Sweep report: {sweep.folder}",
        "",
        f"{sweep.kind} sweep; {len(sweep.complete)} completed, {len(sweep.failed)} failed, "
        f"{len(sweep.unfinished)} unfinished trials; {len(ranked)} configurations.",
        f"Objective: {objective} (the best epoch's validation value), maximised. Validation ranks; the test",
        "columns are reported only and never used to rank or choose.",
        "Experiment: " + ", ".join(f"{k}={v}" for k, v in identity.items() if v is not None),
        "",
        "## Best configuration",
        "",
        f"{best.label}: {_fmt(best.mean, best.std)} over {len(best.trials)} seed(s)"
        f" (trials {', '.join(str(row['trial']) for row in best.trials)}). Repeat it over seeds:",
        "",
        "```",
        best.command(),
        "```",
        "",
        "## Ranking (mean ± sample std over seeds)",
        "",
        "| rank | configuration | seeds | failed | validation | test (not used for selection) | best epoch |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rank, config in enumerate(ranked, start=1):
        epochs = ", ".join(str(row.get("best_epoch")) for row in config.trials)
        test = _fmt(*_mean_std(config.test_values()))
        lines.append(
            f"| {rank} | `{config.label}` | {len(config.trials)} | {len(config.failed)} | "
            f"{_fmt(config.mean, config.std)} | {test} | {epochs} |"
        )
    lines += ["", "## Failed trials", ""]
    lines += [f"- trial {row['trial']}: {row.get('reason')}" for row in sweep.failed] or ["None."]
    if sweep.unfinished:
        lines += ["", "## Unfinished trials (left out)", ""]
        lines += [f"- trial {row['trial']}: {row.get('run_dir') or 'no folder'}" for row in sweep.unfinished]
    lines += ["", "## Parameter importances", "", f"Method: {method}.", ""]
    lines += [f"- `{name}`: {value:.3f}" for name, value in importances.items()]
    lines += ["", "## Charts", ""]
    lines += [f"![{name}]({name})" for name in written if name.endswith(".png")]
    return "\n".join(lines) + "\n"
