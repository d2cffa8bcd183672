"""The sweep report's PNG charts (matplotlib, Agg canvas per figure: no display, no global backend change)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from xraycls.experiment._files import write_atomic

__all__ = ["plot_history", "plot_importances", "plot_parallel", "plot_per_finding"]

DPI = 110


def _save(fig: Figure, out: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    return write_atomic(out, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))


def plot_history(trials: list[dict[str, Any]], objective: str, out: Path) -> Path:
    """Objective per trial number and the best so far (maximised); failed trials as crosses on the floor."""
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    done = sorted((row["trial"], row["value"]) for row in trials if row.get("value") is not None)
    xs, ys = [x for x, _ in done], [y for _, y in done]
    ax.scatter(xs, ys, label="trial", zorder=3)
    ax.step(xs, np.maximum.accumulate(ys), where="post", color="C1", label="best so far")
    failed = [row["trial"] for row in trials if row.get("value") is None]
    if failed:
        ax.scatter(failed, [min(ys)] * len(failed), marker="x", color="C3", label="failed", zorder=3)
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{objective} (validation)")
    ax.set_title("Optimisation history")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, out)


def plot_importances(importances: dict[str, float], method: str, out: Path) -> Path:
    fig = Figure(figsize=(6, 0.5 + 0.4 * len(importances)))
    ax = fig.add_subplot()
    names = list(importances)[::-1]
    ax.barh(names, [importances[name] for name in names])
    ax.set_xlabel("importance (sums to 1)")
    ax.set_title(f"Parameter importances: {method}", fontsize=9)
    return _save(fig, out)


def plot_parallel(
    trials: list[dict[str, Any]], params: dict[str, list[Any]], objective: str, out: Path
) -> Path:
    """One line per completed trial across its parameters (scaled to [0, 1], log for >1 decade) and value."""
    values = [row["value"] for row in trials]
    axes = {**params, objective: values}
    fig = Figure(figsize=(1.8 * len(axes) + 1, 4))
    ax = fig.add_subplot()
    columns, ticks = [], []
    for column in axes.values():
        scaled, labels = _scaled(column)
        columns.append(scaled)
        ticks.append(labels)
    lo, hi = min(values), max(values)
    cmap = _viridis()
    for i in range(len(values)):
        shade = 0.5 if hi == lo else (values[i] - lo) / (hi - lo)
        ax.plot(range(len(axes)), [column[i] for column in columns], color=cmap(shade), alpha=0.8)
    ax.set_xticks(range(len(axes)), list(axes), rotation=20, ha="right")
    for x, (low, high) in enumerate(ticks):
        ax.axvline(x, color="0.7", lw=0.8)
        ax.annotate(low, (x, -0.06), ha="center", va="top", fontsize=7)
        ax.annotate(high, (x, 1.04), ha="center", va="bottom", fontsize=7)
    ax.set_ylim(-0.15, 1.15)
    ax.set_yticks([])
    ax.set_title("Parallel coordinates (colour: objective)")
    return _save(fig, out)


def plot_per_finding(trials: list[dict[str, Any]], out: Path) -> Path:
    """Validation AUROC per finding (columns) for every completed trial (rows); blank where not measured."""
    findings = list(dict.fromkeys(k for row in trials for k in (row.get("val_auroc_per_finding") or {})))
    grid = np.array(
        [[_nan((row.get("val_auroc_per_finding") or {}).get(name)) for name in findings] for row in trials]
    )
    fig = Figure(figsize=(0.55 * len(findings) + 2, 0.35 * len(trials) + 1.8))
    ax = fig.add_subplot()
    low = min(0.5, float(np.nanmin(grid))) if np.isfinite(grid).any() else 0.5  # 0.5 = chance
    image = ax.imshow(np.ma.masked_invalid(grid), vmin=low, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(findings)), findings, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(trials)), [f"trial {row['trial']}" for row in trials], fontsize=8)
    fig.colorbar(image, ax=ax, label="validation AUROC")
    ax.set_title("Validation AUROC per finding")
    return _save(fig, out)


def _viridis() -> Any:
    from matplotlib import colormaps

    return colormaps["viridis"]


def _nan(value: Any) -> float:
    return math.nan if value is None else float(value)


def _scaled(column: list[Any]) -> tuple[list[float], tuple[str, str]]:
    numbers = [_number(value) for value in column]
    if all(number is not None for number in numbers):
        low, high = min(numbers), max(numbers)
        use_log = low > 0 and high / low > 10
        f = math.log10 if use_log else float
        span = (f(high) - f(low)) or 1.0
        return [(f(n) - f(low)) / span for n in numbers], (f"{low:.3g}", f"{high:.3g}")
    choices = sorted({str(value) for value in column})
    step = 1.0 / max(len(choices) - 1, 1)
    return [choices.index(str(value)) * step for value in column], (choices[0], choices[-1])


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
