"""PNG plots of a run: training curves from Lightning's metrics.csv, ROC curves, a grid of sample images.

Figures are plain `matplotlib.figure.Figure` objects drawn on the Agg canvas: no pyplot, so importing or
calling this module changes no global matplotlib state (backend, open figures) and works in threads and on
machines without a display. Each PNG is written atomically (`xraycls.files.save_png`).
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from sklearn.metrics import auc, roc_curve

from xraycls.files import save_png
from xraycls.findings import LABELS

__all__ = ["plot_training_curves", "plot_roc_curves", "plot_sample_grid"]

log = logging.getLogger(__name__)

DPI = 110
_LOSS, _LR = "train/loss", "lr"
_TRAIN_EPOCH = "train/loss_epoch"  # logged once per training epoch, after the epoch's validation
_VAL_AUROC = ("val/auroc_macro14", "val/auroc_macro15", "val/auroc_seed_compat")
_SMOOTH_MIN_POINTS = 50  # from this many loss points on, a moving average is drawn over the raw curve


def _save(fig: Figure, out: Path) -> Path:
    return save_png(fig, out, dpi=DPI, bbox_inches="tight")


def _series(table: pd.DataFrame, x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows where both columns are set (CSVLogger writes sparse rows), as float arrays sorted by x."""
    if x not in table or y not in table:
        return np.empty(0), np.empty(0)
    rows = table[[x, y]].apply(pd.to_numeric, errors="coerce").dropna().sort_values(x)
    return rows[x].to_numpy(dtype=float), rows[y].to_numpy(dtype=float)


def _read_metrics(metrics_csv: Path) -> pd.DataFrame:
    metrics_csv = Path(metrics_csv)
    if not metrics_csv.is_file():
        raise FileNotFoundError(f"metrics file not found: {metrics_csv}")
    try:
        return pd.read_csv(metrics_csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{metrics_csv}: not a readable metrics CSV ({err})") from err


def _loss_lr_figure(table: pd.DataFrame) -> Figure | None:
    """train/loss and lr against the optimizer step, one panel each; None when neither was logged."""
    panels = [(col, label) for col, label in ((_LOSS, "train loss"), (_LR, "learning rate")) if col in table]
    panels = [(col, label, *_series(table, "step", col)) for col, label in panels]
    panels = [panel for panel in panels if len(panel[2])]
    if not panels:
        return None
    fig = Figure(figsize=(6 * len(panels), 4))
    for ax, (col, label, steps, values) in zip(
        fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True
    ):
        ax.plot(
            steps, values, linewidth=0.8, alpha=0.5 if len(values) >= _SMOOTH_MIN_POINTS else 1.0, label=col
        )
        if col == _LOSS and len(values) >= _SMOOTH_MIN_POINTS:
            window = max(len(values) // 50, 5)
            smooth = pd.Series(values).rolling(window, min_periods=1).mean().to_numpy()
            ax.plot(steps, smooth, linewidth=1.6, label=f"moving mean ({window} steps)")
            ax.legend(loc="upper right")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(f"{label} per step")
        ax.grid(alpha=0.3)
        if col == _LR:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.tight_layout()
    return fig


def _fit_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows the fit logged: up to its last training-epoch row. After fit, the run validates and tests the
    best checkpoint again; Lightning logs those at the fit's last step with epoch = max_epochs, an epoch
    that was never trained, and the best epoch's values (metrics.csv keeps them; summary.json has them)."""
    if _TRAIN_EPOCH not in table:
        return table
    trained = np.flatnonzero(table[_TRAIN_EPOCH].notna().to_numpy())
    return table.iloc[: trained[-1] + 1] if len(trained) else table


def _val_auroc_figure(table: pd.DataFrame) -> Figure | None:
    """The three validation AUROCs against the epoch, of the fit's epochs only; None when none was logged."""
    table = _fit_rows(table)
    curves = [(col, *_series(table, "epoch", col)) for col in _VAL_AUROC]
    curves = [curve for curve in curves if len(curve[1])]
    if not curves:
        return None
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for col, epochs, values in curves:
        ax.plot(epochs, values, marker="o", label=col)
    ax.set_xlabel("epoch")
    ax.set_ylabel("AUROC")
    ax.set_title("validation AUROC per epoch")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    epochs = sorted({e for _, xs, _ in curves for e in xs})
    if len(epochs) <= 20:  # whole epochs only; matplotlib would otherwise tick 0.5, 1.5, ...
        ax.set_xticks(epochs)
    fig.tight_layout()
    return fig


def plot_training_curves(metrics_csv: Path, out_dir: Path) -> list[Path]:
    """From Lightning CSVLogger's metrics.csv, write the plots its columns allow; returns the files written.

    ``out_dir/train_loss_lr.png``: ``train/loss`` and ``lr`` against ``step`` (two panels, the guide's
    plot; a moving mean is drawn over a long loss curve). ``out_dir/val_auroc.png``: ``val/auroc_macro14``,
    ``val/auroc_macro15`` and ``val/auroc_seed_compat`` against ``epoch``, for the epochs the fit trained
    (rows after the last ``train/loss_epoch`` are the best checkpoint's evaluation, not an epoch). A plot
    whose columns are all absent (or empty) is skipped with a log line. Raises FileNotFoundError /
    ValueError for a missing or unreadable CSV.
    """
    table = _read_metrics(metrics_csv)
    out_dir = Path(out_dir)
    written = []
    for name, build in (("train_loss_lr.png", _loss_lr_figure), ("val_auroc.png", _val_auroc_figure)):
        fig = build(table)
        if fig is None:
            log.info("%s: no data for %s (columns: %s); skipped", metrics_csv, name, list(table.columns))
            continue
        written.append(_save(fig, out_dir / name))
    return written


def _check_matrix(name: str, array: np.ndarray, rows: int | None, columns: int) -> None:
    if array.ndim != 2 or array.shape[1] != columns or (rows is not None and array.shape[0] != rows):
        expected = f"[{rows if rows is not None else 'N'}, {columns}]"
        raise ValueError(f"{name} must be {expected} (one column per label name), got {list(array.shape)}")


def _binary_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0/1, got values {np.unique(labels)[:10].tolist()}")
    return labels.astype(bool)


def _roc_figure(probs: np.ndarray, labels: np.ndarray, label_names: Sequence[str], title: str) -> Figure:
    probs = np.asarray(probs, dtype=np.float64)
    _check_matrix("probs", probs, None, len(label_names))
    _check_matrix("labels", np.asarray(labels), len(probs), len(label_names))
    truth = _binary_labels(labels)
    if not np.isfinite(probs).all():
        raise ValueError("probs contains NaN or infinite scores")
    fig = Figure(figsize=(8.5, 6.5))
    ax = fig.subplots()
    colours = _palette(len(label_names))
    for k, name in enumerate(label_names):
        positives = int(truth[:, k].sum())
        if positives == 0 or positives == len(truth):
            missing = "positives" if positives == 0 else "negatives"
            ax.plot([], [], color=colours[k], label=f"{name} (AUC n/a: no {missing})")
            continue
        fpr, tpr, _ = roc_curve(truth[:, k], probs[:, k])
        ax.plot(
            fpr,
            tpr,
            color=colours[k],
            linewidth=1.2,
            label=f"{name} (AUC {auc(fpr, tpr):.3f}, n+={positives})",
        )
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title or f"ROC per label ({len(truth)} images)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    return fig


def _palette(count: int) -> list[tuple[float, ...]]:
    """`count` distinct colours: tab20's 20 (15 labels need more than tab10's 10)."""
    cmap = colormaps["tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


def plot_roc_curves(
    probs: np.ndarray,
    labels: np.ndarray,
    out: Path,
    *,
    label_names: Sequence[str] = LABELS,
    title: str = "",
) -> Path:
    """One figure with a ROC curve per label, AUC and positive count in the legend; returns `out`.

    `probs` [N, L] scores (probabilities or logits: the curve only depends on their order) and `labels`
    [N, L] of 0/1, columns in `label_names` order. A label with no positives (or no negatives) has no
    curve and is listed as "AUC n/a". Raises ValueError for mismatched shapes, non-binary labels, NaN scores.
    """
    return _save(_roc_figure(probs, labels, label_names, title), out)


def _tile_title(row: np.ndarray, label_names: Sequence[str]) -> str:
    names = [name for name, value in zip(label_names, row, strict=True) if value]
    return "\n".join(textwrap.wrap(", ".join(names) or "No Finding", width=28))


def _sample_grid_figure(
    images: np.ndarray, labels: np.ndarray, label_names: Sequence[str], ncols: int, title: str
) -> Figure:
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(
            f"images must be uint8 [N, H, W] with N >= 1, got {images.dtype} {list(images.shape)}"
        )
    _check_matrix("labels", np.asarray(labels), len(images), len(label_names))
    truth = _binary_labels(labels)
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    ncols = min(ncols, len(images))
    nrows = -(-len(images) // ncols)
    fig = Figure(figsize=(3.2 * ncols, 3.5 * nrows + (0.4 if title else 0)))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    # More axes than images when the last row is not full: those tiles stay empty.
    for ax, image, row in zip(axes, images, truth, strict=False):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(_tile_title(row, label_names), fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_sample_grid(
    images: np.ndarray,
    labels: np.ndarray,
    out: Path,
    *,
    label_names: Sequence[str] = LABELS,
    ncols: int = 3,
    title: str = "",
) -> Path:
    """A grid of gray images (uint8 [N, H, W], 0 black, 255 white), each titled with its positive label
    names ("No Finding" when none), `ncols` per row; returns `out`. `labels` is [N, L] of 0/1."""
    return _save(_sample_grid_figure(images, labels, label_names, ncols, title), out)
