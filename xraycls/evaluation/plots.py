"""Figures of an evaluation: precision-recall curves per label, and the forest plot of `xraycls compare`.

ROC curves are `xraycls.report.plots.plot_roc_curves` (the run's own plot); reliability diagrams are
`xraycls.evaluation.calibration.plot_reliability`. Figures are plain `Figure`s written by
`xraycls.files.save_png` (no pyplot, no global matplotlib state).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from sklearn.metrics import average_precision_score, precision_recall_curve

from xraycls.files import save_png
from xraycls.findings import LABELS

__all__ = ["plot_pr_curves", "plot_forest"]


def plot_pr_curves(probs: np.ndarray, labels: np.ndarray, out: Path, *, title: str = "") -> Path:
    """One figure, a precision-recall curve per label (AP and prevalence in the legend); returns `out`."""
    truth = np.asarray(labels) > 0.5
    fig = Figure(figsize=(8.5, 6.5))
    ax = fig.subplots()
    cmap = colormaps["tab20"]
    for k, name in enumerate(LABELS):
        positives = int(truth[:, k].sum())
        if positives in (0, len(truth)):
            ax.plot([], [], color=cmap(k), label=f"{name} (AP n/a: one class)")
            continue
        precision, recall, _ = precision_recall_curve(truth[:, k], probs[:, k])
        ap = average_precision_score(truth[:, k], probs[:, k])
        ax.step(recall, precision, where="post", color=cmap(k), linewidth=1.2,
                label=f"{name} (AP {ap:.3f}, prevalence {positives / len(truth):.3f})")  # fmt: skip
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall (sensitivity)", ylabel="precision")
    ax.set_title(title or f"precision-recall per label ({len(truth)} images)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    return save_png(fig, out, dpi=110, bbox_inches="tight")


def plot_forest(
    rows: Sequence[str],
    models: Mapping[str, Mapping[str, tuple[float | None, float | None, float | None]]],
    out: Path,
    *,
    title: str = "",
) -> Path:
    """Forest plot: per row (metric or finding), each model's AUROC (point) and interval (bar).

    `models` maps a model name to {row: (value, lo, hi)}; a None value is left out.
    """
    names = list(models)
    fig = Figure(figsize=(8.0, 0.32 * len(rows) * max(1, len(names)) + 1.5))
    ax = fig.subplots()
    cmap = colormaps["tab10"]
    step = 0.8 / max(1, len(names))
    for m, name in enumerate(names):
        ys, xs, lo, hi = [], [], [], []
        for r, row in enumerate(rows):
            value, low, high = models[name].get(row, (None, None, None))
            if value is None:
                continue
            ys.append(len(rows) - 1 - r + 0.4 - (m + 0.5) * step)
            xs.append(value)
            lo.append(value - low if low is not None else 0.0)
            hi.append(high - value if high is not None else 0.0)
        ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", markersize=4, capsize=2, color=cmap(m % 10), label=name)
    ax.set_yticks(range(len(rows)), list(reversed(rows)), fontsize=8)
    ax.axvline(0.5, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("AUROC (95% patient-bootstrap interval)")
    ax.set_title(title or "AUROC per finding and macro")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return save_png(fig, out, dpi=110, bbox_inches="tight")
