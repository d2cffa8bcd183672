"""What the W&B logger turns a run's results into: per-finding AUROC tables (one per stage, and one row per
validation epoch and finding), the test ROC curves as a W&B line plot, and the model bundle as an artifact.

Plain functions of plain values, so each is tested without a W&B run; `wandb` is imported where used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "EPOCH_TABLE_COLUMNS",
    "ROC_GRID_POINTS",
    "auroc_table",
    "epoch_auroc_table",
    "roc_points",
    "roc_curves_plot",
    "model_artifact",
]

EPOCH_TABLE_COLUMNS = ["epoch", "finding", "auroc"]
# The ROC curves are drawn on a fixed false-positive-rate grid: 101 points per finding keep the plot's table
# at ~1,500 rows whatever the test set's size (W&B custom charts sample tables above 10,000 rows).
ROC_GRID_POINTS = 101


def auroc_table(per_finding: Mapping[str, float | None]) -> Any:
    """A `wandb.Table` (finding, auroc) with one row per label, in the order given."""
    import wandb

    return wandb.Table(
        columns=["finding", "auroc"], data=[[name, value] for name, value in per_finding.items()]
    )


def epoch_auroc_table(per_epoch: Mapping[int, Mapping[str, float]]) -> Any:
    """A `wandb.Table` (epoch, finding, auroc): a row per validation epoch and label, epochs ascending.

    The long layout lets a W&B custom chart draw one line per finding against the epoch.
    """
    import wandb

    rows = [
        [int(epoch), name, float(value)]
        for epoch in sorted(per_epoch)
        for name, value in per_epoch[epoch].items()
    ]
    return wandb.Table(columns=EPOCH_TABLE_COLUMNS, data=rows)


def roc_points(probs: np.ndarray, labels: np.ndarray, label_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Each label's true-positive rate on `ROC_GRID_POINTS` false-positive rates from 0 to 1 (labels with
    a single class in `labels` are left out: their ROC curve is undefined)."""
    from sklearn.metrics import roc_curve

    grid = np.linspace(0.0, 1.0, ROC_GRID_POINTS)
    truth = np.asarray(labels) >= 0.5
    curves = {}
    for k, name in enumerate(label_names):
        if truth[:, k].all() or not truth[:, k].any():
            continue
        fpr, tpr, _ = roc_curve(truth[:, k], probs[:, k])
        curves[name] = np.interp(grid, fpr, tpr)
    return curves


def roc_curves_plot(probs: np.ndarray, labels: np.ndarray, label_names: Sequence[str], title: str) -> Any:
    """A W&B line plot (`wandb.plot.line_series`): one ROC curve per label, or None when no label has both
    classes. `probs` and `labels` are [N, len(label_names)]."""
    import wandb

    curves = roc_points(probs, labels, label_names)
    if not curves:
        return None
    grid = np.linspace(0.0, 1.0, ROC_GRID_POINTS).tolist()
    return wandb.plot.line_series(
        xs=grid,
        ys=[curve.tolist() for curve in curves.values()],
        keys=list(curves),
        title=title,
        xname="false positive rate",
    )


def model_artifact(model_dir: Path, run_id: str, metadata: Mapping[str, Any]) -> Any:
    """A `wandb.Artifact` of type `model` named `model-<run id>` holding every file of the bundle."""
    import wandb

    artifact = wandb.Artifact(name=f"model-{run_id}", type="model", metadata=dict(metadata))
    artifact.add_dir(str(model_dir))
    return artifact
