"""compare.md, compare.csv and forest.png of `xraycls compare` (the scoring is `xraycls.evaluation.compare`).

Published rows come from `xraycls.report.cost.published` (the one home of the guide's figures): the two eval
AUC / loss figures, marked PUBLISHED with their split, metric and source. Rows from the papers are left out
because their tables could not be checked here.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from xraycls.disclaimer import DISCLAIMER
from xraycls.evaluation.bootstrap import MACROS
from xraycls.evaluation.plots import plot_forest
from xraycls.files import write_text
from xraycls.findings import LABELS
from xraycls.report.cost.published import PUBLISHED

__all__ = ["ROWS", "PUBLISHED_METRIC", "published_rows", "write_report"]

ROWS: tuple[str, ...] = (*MACROS, *LABELS)
PUBLISHED_METRIC = "eval AUC / eval loss"
_PUBLISHED_SPLIT = "the guide's own random 95/5 image split (patients leak; like split=seed_random)"
_PUBLISHED_KIND = "softmax over the 15 logits, then sklearn roc_auc_score: our auroc_seed_compat"
PAPERS_NOTE = (
    "Rows from the papers (e.g. Wang et al. 2017, CheXNet) are omitted: their tables could not be checked "
    "here, and a number we cannot point to in its source is not published."
)
_CSV_COLUMNS = (
    "kind", "model", "path", "split", "part", "images", "row", "auroc", "lo", "hi", "vs", "difference",
    "diff_lo", "diff_hi", "p_bootstrap", "delong_difference", "delong_lo", "delong_hi", "p_delong", "loss",
    "source", "note",
)  # fmt: skip


def published_rows() -> list[dict[str, Any]]:
    """The guide's eval AUC and loss figures: {"source", "hardware", "split", "metric", "auroc", "loss"}."""
    rows = []
    for figure in PUBLISHED:
        if figure.figure != PUBLISHED_METRIC:
            continue
        auroc, loss = (float(part) for part in figure.value.split("/"))
        rows.append({"source": figure.source, "hardware": figure.hardware, "split": _PUBLISHED_SPLIT,
                     "metric": _PUBLISHED_KIND, "auroc": auroc, "loss": loss})  # fmt: skip
    return rows


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _cell(score: tuple[float | None, float | None, float | None]) -> str:
    value, lo, hi = score
    return f"{_fmt(value)} [{_fmt(lo)}, {_fmt(hi)}]"


def _paired_table(key: str, ref: str, result: Mapping[str, Any]) -> list[str]:
    lines = [
        f"### {key} - {ref}",
        "",
        "| row | difference [95% CI] | p (paired bootstrap) | DeLong difference [95% CI] | p (DeLong) |",
        "|---|---|---|---|---|",
    ]
    for row in ROWS:
        boot = result[row] if row in MACROS else result["auroc_per_finding"][row]
        delong = result["delong"].get(row) if row not in MACROS else None
        d_text = (
            "n/a (per finding only)"
            if delong is None
            else (
                f"{_fmt(delong['difference'])} [{_fmt(delong['interval'][0])}, {_fmt(delong['interval'][1])}]"
            )
        )
        p_delong = "n/a" if delong is None else _fmt(delong["p_value"], 3)
        lines.append(
            f"| {row} | {_fmt(boot['difference'])} [{_fmt(boot['interval'][0])}, {_fmt(boot['interval'][1])}]"
            f" | {_fmt(boot['p_value'], 3)} | {d_text} | {p_delong} |"
        )
    return [*lines, ""]


def _markdown(models: Sequence[Any], paired: Mapping[str, Any], resamples: int, seed: int) -> str:
    header = "| model | path | kind | split | part | images | patients |"
    lines = ["# Model comparison", "", DISCLAIMER, "", header, "|---|---|---|---|---|---:|---:|"]
    for m in models:
        patients = len(set(m.scored.patients.tolist()))
        lines.append(
            f"| {m.key} | {m.path} | {m.kind} | {m.split} | {m.part} | {len(m.scored.images)} | {patients} |"
        )
    lines += [
        "",
        f"AUROC per finding and macro, each with its 95% interval: percentile of {resamples} patient "
        f"resamples (seed {seed}; every image of a drawn patient comes along), the same resamples for every "
        "model. Rescored here from each predictions file, so every model follows one rule.",
        "",
        "| row | " + " | ".join(m.key for m in models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for row in ROWS:
        lines.append(f"| {row} | " + " | ".join(_cell(m.scores[row]) for m in models) + " |")
    lines += ["", f"## Paired differences (each model - {models[0].key})", ""]
    for key, result in paired.items():
        if isinstance(result, str):
            lines += [f"### {key} - {models[0].key}", "", f"No paired column: {result}.", ""]
        else:
            lines += _paired_table(key, models[0].key, result)
    lines += [
        "Paired bootstrap: both models under the same patient resamples; p = two-sided, from the share of "
        "resampled differences on either side of 0. DeLong (1988): per finding, treats images as "
        "independent, so it is optimistic when patients have many images.",
        "",
        "## Published (PUBLISHED: not measured here)",
        "",
        "| source | split | metric | AUROC | loss |",
        "|---|---|---|---:|---:|",
    ]
    for row in published_rows():
        lines.append(f"| PUBLISHED: {row['source']} | {row['split']} | {row['metric']} | {row['auroc']:.4f} "
                     f"| {row['loss']:.4f} |")  # fmt: skip
    lines += ["", PAPERS_NOTE, ""]
    return "\n".join(lines)


def _csv(models: Sequence[Any], paired: Mapping[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    ref = models[0].key
    for m in models:
        result = paired.get(m.key)
        for row in ROWS:
            value, lo, hi = m.scores[row]
            entry: dict[str, Any] = {"kind": "model", "model": m.key, "path": str(m.path), "split": m.split,
                                     "part": m.part, "images": len(m.scored.images), "row": row,
                                     "auroc": value, "lo": lo, "hi": hi}  # fmt: skip
            if isinstance(result, str):
                entry.update(vs=ref, note=result)
            elif result is not None:
                boot = result[row] if row in MACROS else result["auroc_per_finding"][row]
                entry.update(vs=ref, difference=boot["difference"], diff_lo=boot["interval"][0],
                             diff_hi=boot["interval"][1], p_bootstrap=boot["p_value"])  # fmt: skip
                delong = result["delong"].get(row) if row not in MACROS else None
                if delong is not None:
                    entry.update(delong_difference=delong["difference"], delong_lo=delong["interval"][0],
                                 delong_hi=delong["interval"][1], p_delong=delong["p_value"])  # fmt: skip
            writer.writerow(entry)
    for row in published_rows():
        writer.writerow({"kind": "PUBLISHED", "model": row["source"], "split": row["split"],
                         "row": "auroc_seed_compat", "auroc": row["auroc"], "loss": row["loss"],
                         "source": f"{row['source']} ({row['hardware']})",
                         "note": row["metric"]})  # fmt: skip
    return buffer.getvalue()


def write_report(
    models: Sequence[Any], paired: Mapping[str, Any], out: Path, *, resamples: int, seed: int
) -> dict[str, Path]:
    """Write compare.md, compare.csv and forest.png into `out`; returns their paths by kind."""
    out.mkdir(parents=True, exist_ok=True)
    written = {
        "markdown": write_text(out / "compare.md", _markdown(models, paired, resamples, seed)),
        "csv": write_text(out / "compare.csv", _csv(models, paired)),
    }
    forest = {f"{m.key} ({m.split} {m.part})": m.scores for m in models}
    written["forest"] = plot_forest(list(ROWS), forest, out / "forest.png")
    return written
