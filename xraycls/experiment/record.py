"""The sweep record: one row per trial in `<sweep dir>/trials.csv`, backed by the log `trials.jsonl`.

`TrialRecord` is a Hydra callback (`hydra.callbacks` in conf/hparams_search/*.yaml). It runs in each
trial's own process (Hydra's basic launcher: the sweep's; submitit: the job's), so it sees every launcher:
- on_job_start appends a RUNNING line, on_job_end the trial's final line: COMPLETE, or FAIL with the reason
  (the exception the job raised, or an objective that is missing or not finite). trials.jsonl is that
  append-only log (under an fcntl lock); the last line per trial number wins, so a trial marked interrupted
  later, or rerun by a grid relaunched into the same folder, replaces its earlier lines.
- trials.csv is rewritten from the log (temp file + os.replace) after every line: one row per trial in its
  latest state. A sweep killed mid-way leaves each finished trial on disk and its running one as RUNNING.

Selection: `value` (what train.py returned: `selected_by`, the best epoch's validation metric) and the
`val_*` columns choose; `best_epoch` comes from best-epochNN.ckpt (0-based, as Lightning counts). The
`test_*` columns are reported for the record and never used to rank or select.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from xraycls.experiment._files import append_line, locked, write_text_atomic

__all__ = [
    "TRIALS_CSV",
    "TRIALS_JSONL",
    "RUNNING",
    "COMPLETE",
    "FAIL",
    "INTERRUPTED",
    "IDENTITY_KEYS",
    "TrialRecord",
    "append_trials",
    "best_epoch",
    "csv_columns",
    "csv_record",
    "csv_text",
    "experiment_identity",
    "failure_reason",
    "mark_interrupted",
    "parse_overrides",
    "read_trials",
    "trial_row",
]

log = logging.getLogger(__name__)

TRIALS_JSONL, TRIALS_CSV, _LOCK = "trials.jsonl", "trials.csv", ".trials.lock"
RUNNING, COMPLETE, FAIL = "RUNNING", "COMPLETE", "FAIL"
INTERRUPTED = "interrupted: the sweep stopped while this trial ran"
# What makes two trials the same experiment: the data, its split and the training length.
IDENTITY_KEYS = (
    "data.root",
    "data.split",
    "data.split_seed",
    "data.split_row_order",
    "data.val_fraction",
    "data.test_fraction",
    "trainer.max_epochs",
)
_METRICS = ("loss", "auroc_macro14", "auroc_macro15", "auroc_seed_compat")
_REASON_CHARS = 500


def parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    """`key=value` overrides as {key: value} (a leading + or ++ dropped; deletions `~key` skipped)."""
    parsed: dict[str, str] = {}
    for item in overrides:
        key, sep, value = str(item).partition("=")
        if not sep or key.startswith("~"):
            continue
        parsed[key.lstrip("+")] = value
    return parsed


def experiment_identity(config: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """The IDENTITY_KEYS values of a (resolved or live) run config; a key that cannot be read is None."""
    cfg = config if isinstance(config, DictConfig) else OmegaConf.create(dict(config))
    identity: dict[str, Any] = {}
    for key in IDENTITY_KEYS:
        try:
            identity[key] = OmegaConf.select(cfg, key, default=None)
        except Exception:  # an interpolation only the live job can resolve
            identity[key] = None
    return identity


def best_epoch(checkpoint: str | None) -> int | None:
    """The epoch in a best-epochNN.ckpt name (conf/callbacks/default.yaml), or None."""
    match = re.search(r"best-epoch(\d+)", Path(checkpoint).name) if checkpoint else None
    return int(match.group(1)) if match else None


def failure_reason(job_return: JobReturn) -> str | None:
    """Why a trial counts as failed (one line), or None when it returned a finite objective."""
    if job_return.status == JobStatus.FAILED:
        # NOTE: the stored exception is read directly; `return_value` would re-raise it and print to stderr.
        error = job_return._return_value
        return _one_line(f"{type(error).__name__}: {error}")
    value = job_return._return_value
    if value is None:
        return "the run returned no objective (optimized_metric was not measured)"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return _one_line(f"the objective is not a number: {value!r}")
    return None if math.isfinite(number) else f"the objective is {number}"


def trial_row(
    *,
    trial: int,
    status: str,
    overrides: list[str],
    seed: Any,
    identity: Mapping[str, Any],
    run_dir: Path | str | None,
    swept: Iterable[str] = (),
    reason: str | None = None,
    value: float | None = None,
    seconds: float | None = None,
    summary: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One trial's record line; metrics come from its summary.json when there is one."""
    parsed = parse_overrides(overrides)
    summary = summary or {}
    metrics = summary.get("metrics") or {}
    val, test = metrics.get("val") or {}, metrics.get("test") or {}
    return {
        "trial": int(trial),
        "status": status,
        "reason": reason,
        "seed": seed,
        "params": {key: parsed[key] for key in swept if key in parsed and key != "seed"},
        "value": value,
        "selected_by": summary.get("optimized_metric"),
        "best_epoch": best_epoch(summary.get("best_checkpoint")),
        **{f"val_{key}": _finite(val.get(key)) for key in _METRICS},
        "val_auroc_per_finding": {k: _finite(v) for k, v in (val.get("auroc_per_finding") or {}).items()},
        **{f"test_{key}": _finite(test.get(key)) for key in _METRICS},
        "test_auroc_per_finding": {k: _finite(v) for k, v in (test.get("auroc_per_finding") or {}).items()},
        "seconds": None if seconds is None else round(float(seconds), 2),
        "run_dir": None if run_dir is None else str(run_dir),
        "wandb_run_id": summary.get("wandb_run_id"),
        "overrides": list(overrides),
        "experiment": dict(identity),
        "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def read_trials(sweep_dir: Path) -> list[dict[str, Any]]:
    """The latest line per trial number from trials.jsonl, by trial number ([] when there is no log).

    A line that is not JSON (a process killed mid-write) is skipped with a warning naming it.
    """
    path = Path(sweep_dir) / TRIALS_JSONL
    if not path.is_file():
        return []
    latest: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            latest[int(row["trial"])] = row
        except (ValueError, KeyError, TypeError):
            log.warning("%s line %d is not a trial record; skipped", path, number)
    return [latest[key] for key in sorted(latest)]


def append_trials(sweep_dir: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append rows to trials.jsonl and rewrite trials.csv, all under the sweep folder's lock."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with locked(sweep_dir / _LOCK):
        for row in rows:
            append_line(sweep_dir / TRIALS_JSONL, json.dumps(row, allow_nan=False, ensure_ascii=False))
        write_text_atomic(sweep_dir / TRIALS_CSV, csv_text(read_trials(sweep_dir)))


def mark_interrupted(sweep_dir: Path, trials: Iterable[int]) -> None:
    """Record trials left RUNNING by a stopped sweep as FAIL (INTERRUPTED), where the sweep keeps a record."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / TRIALS_JSONL).is_file():
        return
    latest = {row["trial"]: row for row in read_trials(sweep_dir)}
    rows = []
    for trial in trials:
        empty = trial_row(trial=trial, status=FAIL, overrides=[], seed=None, identity={}, run_dir=None)
        row = dict(latest.get(trial) or empty)
        row.update(status=FAIL, reason=INTERRUPTED, recorded_at=datetime.now(timezone.utc).isoformat())
        rows.append(row)
    append_trials(sweep_dir, rows)


class TrialRecord(Callback):
    """Hydra callback writing the sweep record (see the module docstring); does nothing outside `-m`."""

    def __init__(self) -> None:
        self._started: dict[int, float] = {}

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not _in_sweep(config):
            return
        trial = int(config.hydra.job.num)
        self._started[trial] = time.perf_counter()
        self._write(config, trial, RUNNING)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not _in_sweep(config):
            return
        trial = int(config.hydra.job.num)
        reason = failure_reason(job_return)
        summary_path = Path(config.hydra.runtime.output_dir) / "summary.json"
        summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
        if reason is None and summary is None:
            reason = f"the run wrote no {summary_path}"
        value = None if reason else float(job_return._return_value)
        started = self._started.pop(trial, None)
        seconds = None if started is None else time.perf_counter() - started
        self._write(config, trial, FAIL if reason else COMPLETE, reason, value, seconds, summary)

    def _write(self, config: DictConfig, trial: int, status: str, *details: Any) -> None:
        # A record that cannot be written must not take the trial (or the sweep) down with it: say so loudly.
        try:
            reason, value, seconds, summary = (*details, None, None, None, None)[:4]
            overrides = [str(item) for item in config.hydra.overrides.task]
            swept = list((OmegaConf.select(config, "hydra.sweeper.params") or {}).keys())
            row = trial_row(
                trial=trial,
                status=status,
                overrides=overrides,
                seed=config.get("seed"),
                identity=experiment_identity(config),
                run_dir=config.hydra.runtime.output_dir,
                swept=swept,
                reason=reason,
                value=value,
                seconds=seconds,
                summary=summary,
            )
            append_trials(Path(config.hydra.sweep.dir), [row])
        except Exception:
            log.exception("could not record trial %s in %s", trial, config.hydra.sweep.dir)


def _in_sweep(config: DictConfig) -> bool:
    return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


def csv_columns(rows: list[Mapping[str, Any]]) -> list[str]:
    """trials.csv's columns: identity and outcome, the swept parameters, validation per finding, test."""
    params = list(dict.fromkeys(key for row in rows for key in (row.get("params") or {})))
    findings = list(dict.fromkeys(key for row in rows for key in (row.get("val_auroc_per_finding") or {})))
    return [
        "trial",
        "status",
        "reason",
        "seed",
        *params,
        "value",
        "selected_by",
        "best_epoch",
        *(f"val_{key}" for key in _METRICS),
        *(f"val_auroc/{name}" for name in findings),
        *(f"test_{key}" for key in _METRICS),
        "seconds",
        "run_dir",
        "wandb_run_id",
        "overrides",
    ]


def csv_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """A record line flattened to trials.csv's columns (None as blank, overrides space-separated)."""
    flat = {key: value for key, value in row.items() if not isinstance(value, (dict, list))}
    flat.update(row.get("params") or {})
    flat.update({f"val_auroc/{k}": v for k, v in (row.get("val_auroc_per_finding") or {}).items()})
    flat["overrides"] = " ".join(row.get("overrides") or [])
    return {key: "" if value is None else value for key, value in flat.items()}


def csv_text(rows: list[Mapping[str, Any]], columns: list[str] | None = None) -> str:
    """Rows as CSV text with a header (`columns` default: csv_columns(rows))."""
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=columns or csv_columns(rows), extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(csv_record(row) for row in rows)
    return buffer.getvalue()
