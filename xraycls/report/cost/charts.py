"""Bar charts of a cost report: time and money per flavor at 1x and at k x the data (PNG, no pyplot state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from xraycls.files import save_png
from xraycls.report.cost.runs import CostGroup

__all__ = ["plot_cost_bars"]

DPI = 110
_PARTS = (("preparation", "#8c8c8c"), ("fixed", "#4c72b0"), ("per_image", "#dd8452"))


def _parts(group: CostGroup, k: float) -> dict[str, float]:
    """Mean seconds of preparation, fixed and per-image work over the group's runs at k x the data."""
    runs = group.runs
    return {
        "preparation": k * float(np.mean([run.preparation for run in runs])),
        "fixed": float(np.mean([run.fixed for run in runs])),
        "per_image": k * float(np.mean([run.per_image for run in runs])),
    }


def plot_cost_bars(groups: Sequence[CostGroup], scale: float, out: Path, *, money: bool) -> Path:
    """Write a PNG of two panels (1x, k x): per group, ours stacked preparation / fixed / per-image with the
    std of the total as an error bar and each run as a dot, and at k x the naive linear estimate hatched
    beside it. Seconds (hours at k x) or, with money=True, the flavors' currency (unpriced groups: 0)."""
    fig = Figure(figsize=(max(7.0, 2.4 * len(groups) + 4), 4.4), layout="constrained")
    x = np.arange(len(groups))
    for panel, k in enumerate((1.0, scale)):
        ax = fig.add_subplot(1, 2, panel + 1)
        hours = not money and k != 1.0  # k x the data runs for hours: seconds would need 7 digits

        def convert(seconds: float | None, group: CostGroup, hours: bool = hours) -> float:
            if seconds is None:
                return 0.0
            if money:
                return group.flavor.money(seconds) if group.flavor is not None else 0.0
            return seconds / 3600.0 if hours else seconds

        width, shift = (0.38, -0.19) if k != 1.0 else (0.6, 0.0)
        bottom = np.zeros(len(groups))
        for part, color in _PARTS:
            values = np.array([convert(_parts(g, k)[part], g) for g in groups])
            ax.bar(x + shift, values, width, bottom=bottom, color=color, label=part.replace("_", "-"))
            bottom += values
        spread = np.array([convert(g.scaled_stat("total", k).std, g) for g in groups])
        # Times cannot go below 0: the lower whisker stops there; each run is drawn as a dot.
        ax.errorbar(x + shift, bottom, yerr=[np.minimum(spread, bottom), spread], fmt="none", ecolor="black",
                    capsize=3)  # fmt: skip
        for i, group in enumerate(groups):
            runs = [convert(run.scaled(k)["total"], group) for run in group.runs]
            ax.scatter(np.full(len(runs), x[i] + shift), runs, s=14, color="black", zorder=3,
                       label="each run" if i == 0 else None)  # fmt: skip
        if k != 1.0:
            naive = [convert(g.scaled_stat("naive", k).mean, g) for g in groups]
            ax.bar(x + 0.19, naive, width, color="white", edgecolor="black", hatch="//", label="naive linear")
        ax.set_xticks(x, [g.label for g in groups], rotation=15, ha="right")
        ax.set_ylabel(_currency_label(groups) if money else "hours" if hours else "seconds")
        ax.set_title(f"{'cost' if money else 'time'} per run at {k:g}x the data")
        ax.legend(fontsize=8)
    if money and any(g.flavor is not None and g.flavor.placeholder for g in groups):
        fig.suptitle("PLACEHOLDER prices: the arithmetic, not a quote", color="firebrick")
    return _save(fig, out)


def _currency_label(groups: Sequence[CostGroup]) -> str:
    currencies = sorted({g.currency for g in groups if g.currency})
    return " / ".join(currencies) if currencies else "money"


def _save(fig: Figure, out: Path) -> Path:
    return save_png(fig, out, dpi=DPI)
