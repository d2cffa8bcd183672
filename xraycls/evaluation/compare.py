"""`xraycls compare A B [C ...]`: models side by side, with intervals, paired tests and published rows.

Each input is a run directory (summary.json + predictions_test.csv) or an `xraycls evaluate` output
(metrics.json + predictions.csv). Every model is rescored from its predictions file under one rule (95%
percentile interval, patient bootstrap, the same resamples for every model), so the intervals are
comparable; the values can differ from the model's own JSON in the last digits (the file keeps float32
probabilities, 9 digits). The first model (A) is the reference: each other model scored on the same images
with the same labels gets the paired difference (model - A) with its interval and p-value
(`xraycls.evaluation.paired`, patient bootstrap) and DeLong's test per finding; otherwise no paired column,
and the report says why. The report writer is `xraycls.evaluation._compare_report`.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xraycls.evaluation._compare_report import ROWS, write_report
from xraycls.evaluation.bootstrap import confidence_intervals, point_metrics
from xraycls.evaluation.paired import align_images, compare_models
from xraycls.evaluation.predictions import ScoredImages, read_scored_images
from xraycls.inference.calibration import logits_from_probabilities

__all__ = ["ComparedModel", "load_compared", "paired_or_reason", "run_compare"]


@dataclass
class ComparedModel:
    """One input of the comparison, rescored: `scores` {row: (value, lo, hi)} over `ROWS`."""

    key: str  # A, B, C, ...
    path: Path
    kind: str  # "run" or "evaluate"
    split: str
    part: str
    scored: ScoredImages
    logits: np.ndarray
    scores: dict[str, tuple[float | None, float | None, float | None]]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable JSON ({err})") from err


def _source(path: Path) -> tuple[str, str, str, Path]:
    """(kind, split, part, predictions file) of a run directory or an evaluate output."""
    if (path / "metrics.json").is_file():
        metrics = _read_json(path / "metrics.json")
        return "evaluate", str(metrics.get("split")), str(metrics.get("part")), path / "predictions.csv"
    if (path / "summary.json").is_file():
        test = (_read_json(path / "summary.json").get("metrics") or {}).get("test") or {}
        predictions = path / "predictions_test.csv"
        if not predictions.is_file():
            raise FileNotFoundError(
                f"{path}: a run directory without predictions_test.csv (runs write it since xraycls "
                "evaluate exists; score its model/ with `xraycls evaluate` instead)"
            )
        return "run", str(test.get("split")), "test", predictions
    raise FileNotFoundError(
        f"{path}: neither a run directory (summary.json + predictions_test.csv) nor an `xraycls evaluate` "
        "output (metrics.json + predictions.csv)"
    )


def _num(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def load_compared(path: Path, key: str, resamples: int, seed: int) -> ComparedModel:
    """Read one input and score it (point AUROCs and their patient-bootstrap intervals)."""
    path = Path(path)
    kind, split, part, predictions = _source(path)
    scored = read_scored_images(predictions)
    if len(scored.images) == 0:
        raise ValueError(f"{predictions}: no images")
    logits = logits_from_probabilities(scored.probabilities)
    point = point_metrics(logits, scored.labels)
    ci = confidence_intervals(logits, scored.labels, scored.patients, resamples=resamples, seed=seed)
    scores = {}
    for row in ROWS:
        value = point[row] if row in ci and row != "auroc_per_finding" else point["auroc_per_finding"][row]
        lo, hi = ci[row] if row in ci else ci["auroc_per_finding"][row]
        scores[row] = (_num(value), lo, hi)
    return ComparedModel(key, path, kind, split, part, scored, logits, scores)


def paired_or_reason(a: ComparedModel, b: ComparedModel, resamples: int, seed: int) -> dict[str, Any] | str:
    """`compare_models` (b - a) when both are scored on the same images with the same labels, else why not."""
    ids_a, ids_b = a.scored.images, b.scored.images
    only_a, only_b = np.setdiff1d(ids_a, ids_b), np.setdiff1d(ids_b, ids_a)
    if only_a.size or only_b.size or len(ids_a) != len(ids_b):
        return (
            f"{b.key} and {a.key} are scored on different images "
            f"({a.key}: {len(ids_a)}, {b.key}: {len(ids_b)}; "
            f"{only_a.size} only in {a.key}, {only_b.size} only in {b.key}): a paired test needs the same "
            "images, so none is made; compare their intervals only with care (different test sets)"
        )
    try:
        order = align_images(ids_a, ids_b)
    except ValueError as err:
        return f"{b.key} vs {a.key}: {err}"
    if not np.array_equal(a.scored.labels, b.scored.labels[order]):
        return (
            f"{b.key} and {a.key} give the same images different labels (another label file?): no paired test"
        )
    return compare_models(
        ids_a, a.logits, ids_b, b.logits, a.scored.labels, a.scored.patients, resamples=resamples, seed=seed
    )


def run_compare(paths: list[Path], out: Path, *, bootstrap: int = 2000, seed: int = 0) -> dict[str, Path]:
    """Score each input, pair each later one with the first, write compare.md, compare.csv, forest.png."""
    if len(paths) < 2:
        raise ValueError(f"compare needs at least two models, got {len(paths)}")
    if len(paths) > len(string.ascii_uppercase):
        raise ValueError(f"compare takes at most {len(string.ascii_uppercase)} models, got {len(paths)}")
    if bootstrap < 1:
        raise ValueError(f"--bootstrap must be >= 1 (the intervals and the paired test), got {bootstrap}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    for path in paths:  # every input checked before any scoring
        _source(Path(path))
    models = [load_compared(p, string.ascii_uppercase[i], bootstrap, seed) for i, p in enumerate(paths)]
    paired = {m.key: paired_or_reason(models[0], m, bootstrap, seed) for m in models[1:]}
    return write_report(models, paired, out, resamples=bootstrap, seed=seed)
