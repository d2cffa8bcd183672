"""The cost report: markdown tables, CSVs and bar charts of `CostGroup`s, beside the published figures.

Files written to the output folder:

- `cost_report.md`: time and money per flavor at 1x (mean ± sample std, n, and the training seconds'
  coefficient of variation), where the training time goes
  (set-up, compilation, fixed, per-image), the k x extrapolation beside naive linear scaling, the published
  figures (marked as such: never measured here), the flavors and their price sources, and notes;
- `cost_groups.csv`: one row per group, every mean and std in seconds and in the flavor's currency;
- `cost_runs.csv`: one row per run (the numbers the means are made of);
- `published.csv`: the published figures, each with its source;
- `time_per_flavor.png`, `cost_per_flavor.png`: bars at 1x and at k x (ours stacked by part, naive hatched);
  the cost chart only when some group has a price.

Money columns of a flavor whose price is a placeholder carry a `*` and the report says so at the top; so do
groups whose training seconds vary by more than `NOISY_CV` between repeats, and runs priced with a flavor
(`--flavor`) whose plan does not fit their recorded hardware.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from xraycls.files import atomic_path, write_text
from xraycls.report.cost.charts import plot_cost_bars
from xraycls.report.cost.published import PUBLISHED, PUBLISHED_ROWS, PublishedFigure
from xraycls.report.cost.runs import NOISY_CV, CostGroup, Stat

__all__ = ["write_cost_report", "format_duration"]


def format_duration(seconds: float | None) -> str:
    """Seconds as '12.3 s', '4.5 min' or '6.7 h'; '-' for None."""
    if seconds is None:
        return "-"
    if abs(seconds) < 600:
        return f"{seconds:.1f} s"
    if abs(seconds) < 36_000:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _cell(stat: Stat, group: CostGroup | None = None) -> str:
    """'mean ± std' as durations, or as money in the group's currency when `group` is given ('*': placeholder
    price); '-' where there is nothing to show."""
    if stat.mean is None:
        return "-"
    if group is None:
        mean = format_duration(stat.mean)
        return mean if stat.std is None else f"{mean} ± {format_duration(stat.std)}"
    if group.flavor is None:
        return "-"
    unit = f"{group.flavor.currency}{'*' if group.flavor.placeholder else ''}"
    return f"{stat.mean:.4g} {unit}" if stat.std is None else f"{stat.mean:.4g} ± {stat.std:.2g} {unit}"


Column = tuple[str, Callable[[CostGroup], object]]


def _table(columns: Sequence[Column], items: Sequence) -> list[str]:
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(str(get(item)) for _, get in columns) + " |" for item in items]


def _time(q: str) -> Column:
    return q.replace("_", "-"), lambda g: _cell(g.stat(q))


def _cost(q: str) -> Column:
    return f"{q} cost", lambda g: _cell(g.stat(q, money=True), g)


def _scaled(name: str, q: str, k: float, money: bool = False) -> Column:
    return name, lambda g: _cell(g.scaled_stat(q, k, money=money), g if money else None)


def _cv(group: CostGroup) -> str:
    cv = group.training_cv
    return "-" if cv is None else f"{cv:.1%}"


def _warnings(groups: Sequence[CostGroup]) -> list[str]:
    """Block quotes for the top of the report: noisy repeats and flavors that do not fit the runs."""
    out = []
    noisy = [g for g in groups if g.training_cv is not None and g.training_cv > NOISY_CV]
    for group in noisy:
        out += [
            "",
            f"> **NOISY TIMINGS**: {group.label}'s training seconds vary by {group.training_cv:.1%} "
            f"(sample std / mean over {len(group.runs)} runs, > {NOISY_CV:.0%}): the machine was not quiet; "
            "these means are not comparable.",
        ]
    for group in groups:
        out += ["", *(f"> **FLAVOR DOES NOT FIT THE RUNS**: {warning}" for warning in group.warnings)]
    return out


def _markdown(groups: Sequence[CostGroup], k: float, published: Sequence[PublishedFigure]) -> str:
    label: Column = ("flavor", lambda g: g.label)
    placeholders = sorted({g.flavor.name for g in groups if g.flavor is not None and g.flavor.placeholder})
    out = ["# What a run costs", "", f"{sum(len(g.runs) for g in groups)} runs in {len(groups)} group(s)."]
    if placeholders:
        out += [
            "",
            f"> **PLACEHOLDER PRICES** (`*`): no verified price for {', '.join(placeholders)}, so "
            "their money columns show the arithmetic, not a quote. Set `price_per_hour`, `source`, `as_of` "
            "and `placeholder: false` in `experiments/cost_study/flavors/NAME.yaml` for real figures.",
        ]
    out += _warnings(groups)
    out += ["", "## At 1x the data: measured (mean ± std over n runs), then published IPU figures", ""]
    parts = ("preparation", "training", "total")
    cv: Column = ("training CV", _cv)
    out += _table([label, ("n", lambda g: len(g.runs)), *map(_time, parts), *map(_cost, parts), cv], groups)
    if published:  # IPU rows: the guide's own numbers beside ours, never presented as measured
        out += ["| " + " | ".join([*row, "-"]) + " |" for row in PUBLISHED_ROWS]
    out += ["", "## Where the training time goes", ""]
    first = lambda g: g.runs[0].identity  # noqa: E731 - repeats share it (checked when grouping)
    out += _table(
        [
            label,
            *map(_time, ("setup", "compile", "fixed", "per_image")),
            ("train images/s", lambda g: f"{g.stat('train_images_per_s').mean:.1f}"),
            ("epochs", lambda g: first(g)["epochs"]),
            ("train images", lambda g: first(g)["images"]["train"]),
        ],
        groups,
    )
    out += ["", "## Each run", ""]
    out += _table(
        [("flavor", lambda pair: pair[0].label), ("run", lambda pair: pair[1].run_dir),
         *((name, lambda pair, q=q: format_duration(getattr(pair[1], q))) for name, q in _RUN_COLUMNS),
         ("train images/s", lambda pair: f"{pair[1].train_images_per_s:.1f}")],
        [(g, run) for g in groups for run in g.runs],
    )  # fmt: skip
    out += [
        "",
        f"## At {k:g}x the data: set-up and compilation kept, per-image work and preparation scaled",
        "",
    ]
    out += _table(
        [
            label,
            _scaled("total (ours)", "total", k),
            _scaled(f"naive {k:g} x 1x total", "naive", k),
            _scaled("difference", "difference", k),
            _scaled("total cost (ours)", "total", k, True),
            _scaled("naive cost", "naive", k, True),
            _scaled("cost difference", "difference", k, True),
        ],
        groups,
    )
    if published:
        out += [
            "",
            "## Published figures: NOT measured here (ViT-B/16 on the NIH release, not this workload)",
            "",
        ]
        out += _table(
            [
                ("source", lambda p: p.source),
                ("hardware", lambda p: p.hardware),
                ("figure", lambda p: p.figure),
                ("value", lambda p: f"{p.value} (published)"),
            ],
            published,
        )
    flavors = list({g.flavor.name: g.flavor for g in groups if g.flavor is not None}.values())
    if flavors:
        out += ["", "## Prices used", ""]
        out += _table(
            [
                ("flavor", lambda f: f.name),
                ("hardware", lambda f: f.hardware),
                ("price per hour", lambda f: f"{f.price_per_hour:g} {f.currency}"),
                ("source", lambda f: f.source),
                ("as of", lambda f: f.as_of or "-"),
                ("verified", lambda f: "NO: placeholder" if f.placeholder else "yes"),
            ],
            flavors,
        )
    out += [
        "",
        "## How these numbers are made",
        "",
        *_METHOD.format(k=f"{k:g}x", cv=f"{NOISY_CV:.0%}").splitlines(),
    ]
    for group in groups:
        out += [f"- {group.label}: {note}" for note in group.notes]
        out += [f"- {run.run_dir}: {note}" for run in group.runs for note in run.notes]
    return "\n".join(out) + "\n"


_METHOD = """\
- preparation = download + cache build, read from their reports; counted once per run, as the guide
  measured preparation + training (extraction runs inside the download's time).
- training = the run's wall time from its config to its summary (fit, validation, test, export, plots);
  process start-up and imports before it are not included.
- per-image work = epochs x trained images / train images/s + evaluated images / eval images/s, at the
  throughputs measured after warm-up; fixed = training - per-image work (set-up, compilation, warm-up,
  checkpoints, export, plots). At {k}: preparation and per-image work x k, fixed kept; naive = the whole
  1x total x k (the guide's method); difference = naive - ours.
- money = seconds / 3600 x the flavor's price per hour for the whole machine; ± is the sample standard
  deviation over the repeats (on a shared machine it mostly measures the other load); training CV = that
  std / the mean of the training seconds, and above {cv} the report warns that the means are not
  comparable."""

_RUN_COLUMNS = (("preparation", "preparation"), ("training", "training"), ("fixed", "fixed"),
                ("per-image", "per_image"))  # fmt: skip
_QUANTITIES = (
    "preparation",
    "training",
    "total",
    "fixed",
    "per_image",
    "setup",
    "compile",
    "download",
    "prepare",
)


def _group_rows(groups: Sequence[CostGroup], k: float) -> list[dict]:
    rows = []
    for g in groups:
        f = g.flavor
        row: dict = {
            "group": g.label,
            "flavor": f.name if f else "",
            "n": len(g.runs),
            "scale": k,
            "price_per_hour": f.price_per_hour if f else None,
            "currency": g.currency,
            "price_placeholder": f.placeholder if f else None,
            "price_source": f.source if f else None,
        }
        stats = [(f"{q}_s", g.stat(q)) for q in _QUANTITIES]
        stats += [(f"{q}_cost", g.stat(q, money=True)) for q in ("preparation", "training", "total")]
        for q in ("total", "naive", "difference"):
            stats += [
                (f"scaled_{q}_s", g.scaled_stat(q, k)),
                (f"scaled_{q}_cost", g.scaled_stat(q, k, money=True)),
            ]
        for name, stat in stats:
            row[f"{name}_mean"], row[f"{name}_std"] = stat.mean, stat.std
        row["train_images_per_s_mean"] = g.stat("train_images_per_s").mean
        row["training_cv"] = g.training_cv
        row["warnings"] = " | ".join(g.warnings) or None
        row["runs"] = ";".join(str(run.run_dir) for run in g.runs)
        rows.append(row)
    return rows


def _run_rows(groups: Sequence[CostGroup], k: float) -> list[dict]:
    rows = []
    for g in groups:
        for run in g.runs:
            scaled = run.scaled(k)
            rows.append(
                {
                    "group": g.label,
                    "run_dir": str(run.run_dir),
                    **{f"{q}_s": getattr(run, q) for q in _QUANTITIES},
                    "train_images_per_s": run.train_images_per_s,
                    "epochs": run.identity["epochs"],
                    **{f"scaled_{q}_s": scaled[q] for q in ("total", "naive", "difference")},
                }
            )
    return rows


def _write_csv(path: Path, rows: list[dict]) -> Path:
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_path(path) as tmp, open(tmp, "x", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
    return path


def write_cost_report(
    groups: Sequence[CostGroup],
    out_dir: str | Path,
    *,
    scale: float = 500.0,
    published: Sequence[PublishedFigure] = PUBLISHED,
) -> dict[str, Path]:
    """Write the files listed in the module doc into `out_dir`; returns {kind: path} of those written."""
    if not groups:
        raise ValueError("no runs to report: give at least one run directory")
    if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a number > 0 and finite (k x the data), got {scale!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = out / "cost_report.md"
    write_text(markdown, _markdown(groups, scale, published))
    written = {
        "markdown": markdown,
        "groups_csv": _write_csv(out / "cost_groups.csv", _group_rows(groups, scale)),
        "runs_csv": _write_csv(out / "cost_runs.csv", _run_rows(groups, scale)),
        "time_chart": plot_cost_bars(groups, scale, out / "time_per_flavor.png", money=False),
    }
    if published:
        written["published_csv"] = _write_csv(
            out / "published.csv", [vars(p) | {"measured": False} for p in published]
        )
    if any(g.flavor is not None for g in groups):
        written["cost_chart"] = plot_cost_bars(groups, scale, out / "cost_per_flavor.png", money=True)
    return written
