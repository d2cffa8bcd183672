"""Calibration per label: expected calibration error, reliability-diagram data and plot, temperature scaling.

Binning rule: `bins` (default 15) equal-width bins on [0, 1]; bin k holds probabilities in
[k/bins, (k+1)/bins), the last bin also holds 1.0. ECE = sum over non-empty bins of
(count / N) * |mean predicted probability - observed frequency of positives|.

Temperature scaling: per label, p = sigmoid(logit / T) with T > 0 fitted on validation logits by
minimising the mean binary cross-entropy over log T (bounded 1-D search). Dividing by T is monotone, so it
changes no ranking (AUROC, AP unchanged); `map_thresholds` carries probability thresholds through the same
map, so "probability >= threshold" flags the same images before and after. Applying stored temperatures
(`apply_temperatures`, `map_thresholds`) lives in `xraycls.inference.calibration`, beside the bundle that
stores them, and is re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy.optimize import minimize_scalar
from scipy.special import log_expit

from xraycls.files import save_png
from xraycls.findings import LABELS
from xraycls.inference.calibration import apply_temperatures, calibrate_probabilities, map_thresholds

__all__ = [
    "BINNING_RULE",
    "reliability",
    "expected_calibration_error",
    "calibration_report",
    "calibration_summary",
    "plot_reliability",
    "fit_temperatures",
    "apply_temperatures",
    "map_thresholds",
]

_LOG_T_BOUNDS = (np.log(1e-2), np.log(1e2))
BINNING_RULE = (
    "{bins} equal-width bins on [0, 1], bin k = [k/{bins}, (k+1)/{bins}) (the last also holds 1.0); "
    "ECE = sum over non-empty bins of (count / N) * |mean predicted probability - observed frequency|"
)


def reliability(probs: np.ndarray, positive: np.ndarray, bins: int = 15) -> dict[str, list]:
    """One label's diagram data: ``edges`` [bins + 1], ``mean_predicted``, ``observed``, ``count`` [bins].

    Empty bins have count 0 and None for the means.
    """
    probs, positive = np.asarray(probs, dtype=float), np.asarray(positive, dtype=float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.floor(probs * bins).astype(int), 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    sum_p = np.bincount(index, weights=probs, minlength=bins)
    sum_y = np.bincount(index, weights=positive, minlength=bins)
    filled = count > 0
    mean_p = np.where(filled, sum_p / np.maximum(count, 1), np.nan)
    observed = np.where(filled, sum_y / np.maximum(count, 1), np.nan)

    def listed(values: np.ndarray) -> list:
        return [float(v) if np.isfinite(v) else None for v in values]

    return {
        "edges": edges.tolist(),
        "mean_predicted": listed(mean_p),
        "observed": listed(observed),
        "count": count.astype(int).tolist(),
    }


def expected_calibration_error(probs: np.ndarray, positive: np.ndarray, bins: int = 15) -> float:
    """ECE of one label under the module's binning rule; NaN for no images."""
    data = reliability(probs, positive, bins)
    count = np.array(data["count"], dtype=float)
    if count.sum() == 0:
        return float("nan")
    gaps = [
        abs(p - o) for p, o in zip(data["mean_predicted"], data["observed"], strict=True) if p is not None
    ]
    return float(np.dot(count[count > 0], gaps) / count.sum())


def calibration_report(
    probs: np.ndarray, labels: np.ndarray, label_names: Sequence[str] = LABELS, bins: int = 15
) -> dict:
    """{"bins", "ece": {label: float}, "reliability": {label: `reliability` data}} for probs [N, L]."""
    probs, positive = np.asarray(probs, dtype=float), np.asarray(labels) > 0.5
    cols = dict(enumerate(label_names))
    return {
        "bins": bins,
        "ece": {
            name: expected_calibration_error(probs[:, j], positive[:, j], bins) for j, name in cols.items()
        },
        "reliability": {name: reliability(probs[:, j], positive[:, j], bins) for j, name in cols.items()},
    }


def calibration_summary(
    probs: np.ndarray,
    labels: np.ndarray,
    temperatures: Mapping[str, float] | None = None,
    bins: int = 15,
) -> dict:
    """ECE per label of sigmoid `probs` [N, 15] and, given `temperatures`, of the calibrated probabilities
    (``ece_calibrated``, else None): {"bins", "rule", "ece", "temperatures", "ece_calibrated"}."""
    report = calibration_report(probs, labels, LABELS, bins)
    after = None
    if temperatures is not None:
        after = calibration_report(calibrate_probabilities(probs, temperatures), labels, LABELS, bins)["ece"]
    return {
        "bins": bins,
        "rule": BINNING_RULE.format(bins=bins),
        "ece": report["ece"],
        "temperatures": dict(temperatures) if temperatures is not None else None,
        "ece_calibrated": after,
    }


def plot_reliability(diagrams: Mapping[str, Mapping[str, list]], path: str | Path, title: str = "") -> Path:
    """Writes a PNG with one reliability panel per label (bars: observed frequency per bin; diagonal)."""
    names = list(diagrams)
    cols = min(5, max(1, len(names)))
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(3.0 * cols, 3.0 * rows))  # no pyplot: no global matplotlib state
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.ravel(), names, strict=False):
        data = diagrams[name]
        edges = np.asarray(data["edges"])
        observed = np.array([np.nan if v is None else v for v in data["observed"]])
        ax.bar(
            edges[:-1],
            np.nan_to_num(observed),
            width=np.diff(edges),
            align="edge",
            alpha=0.7,
            label="observed",
        )
        ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), title=name, xlabel="predicted", ylabel="observed")
    for ax in axes.ravel()[len(names) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, Path(path), dpi=100)


def _nll(log_t: float, logits: np.ndarray, positive: np.ndarray) -> float:
    z = logits / np.exp(log_t)
    return float(-np.mean(np.where(positive, log_expit(z), log_expit(-z))))


def fit_temperatures(
    logits: np.ndarray, labels: np.ndarray, label_names: Sequence[str] = LABELS
) -> dict[str, float]:
    """{label: T} minimising each label's validation NLL; 1.0 for a label lacking either class."""
    logits, positive = np.asarray(logits, dtype=float), np.asarray(labels) > 0.5
    temperatures = {}
    for j, name in enumerate(label_names):
        if positive[:, j].all() or not positive[:, j].any():
            temperatures[name] = 1.0  # the NLL has no interior minimum: leave the label as it is
            continue
        fit = minimize_scalar(
            _nll, bounds=_LOG_T_BOUNDS, method="bounded", args=(logits[:, j], positive[:, j]),
            options={"xatol": 1e-8},
        )  # fmt: skip
        temperatures[name] = float(np.exp(fit.x))
    return temperatures
