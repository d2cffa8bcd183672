"""What `xraycls predict` writes: the predictions as CSV or JSON, and a grid figure in the guide's style.

Every output carries `xraycls.disclaimer.DISCLAIMER`: the CSV as its first line, a ``#`` comment (read it
back with ``pandas.read_csv(path, skiprows=1)``; ``comment="#"`` would also cut a path holding a ``#``); the
JSON as its ``disclaimer`` key; the figure in its title. CSV columns: ``path`` (as given), ``image`` (file
name), the 15 probabilities named by label in `xraycls.findings.LABELS` order (6 decimals), ``flagged`` (the
flagged findings joined by ``|``, empty when none reaches its threshold). Files are written under a
temporary name and renamed into place.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # matplotlib loads with the grid only: `xraycls predict` starts 0.4 s sooner without it
    from matplotlib.figure import Figure

from xraycls.disclaimer import DISCLAIMER
from xraycls.files import save_png, write_text
from xraycls.findings import LABELS
from xraycls.inference.results import Predictions

__all__ = [
    "OUTPUT_FORMATS",
    "output_format",
    "header_line",
    "predictions_table",
    "predictions_json",
    "write_predictions",
    "format_csv",
    "real_labels",
    "grid_titles",
    "prediction_grid_figure",
    "plot_prediction_grid",
]

OUTPUT_FORMATS: dict[str, str] = {".csv": "csv", ".json": "json"}
GRID_DISPLAY_SIZE = 256  # pixels per tile image: enough to see the film, small enough for a 5x5 figure


def output_format(out: Path) -> str:
    """'csv' or 'json' from the file name; ValueError naming the file for anything else."""
    kind = OUTPUT_FORMATS.get(Path(out).suffix.lower())
    if kind is None:
        raise ValueError(f"--out {out}: the name must end in {' or '.join(OUTPUT_FORMATS)} (the format)")
    return kind


def header_line(predictions: Predictions) -> str:
    """The disclaimer, the model and the flagging rule in one line (the CSV's comment line)."""
    model = f" Model: {predictions.model_dir}." if predictions.model_dir is not None else ""
    return (
        f"{DISCLAIMER}{model} Flagged: probability >= threshold; {predictions.thresholds.describe()}. "
        f"Device: {predictions.device}."
    )


def predictions_table(predictions: Predictions) -> pd.DataFrame:
    """One row per predicted image: path, image, the 15 probabilities (LABELS order), flagged."""
    table = pd.DataFrame(
        {"path": [str(p) for p in predictions.paths], "image": [Path(p).name for p in predictions.paths]}
    )
    probabilities = pd.DataFrame(
        np.asarray(predictions.probabilities, dtype=np.float64), columns=list(LABELS)
    )
    table = pd.concat([table, probabilities], axis=1)
    table["flagged"] = ["|".join(names) for names in predictions.flagged]
    return table


def format_csv(predictions: Predictions) -> str:
    """The CSV text: the ``#`` disclaimer line, then the table."""
    body = predictions_table(predictions).to_csv(index=False, float_format="%.6f", lineterminator="\n")
    return f"# {header_line(predictions)}\n{body}"


def predictions_json(predictions: Predictions) -> dict[str, Any]:
    """The JSON document: disclaimer, model, thresholds, one entry per predicted image, and the failures."""
    thresholds = predictions.thresholds
    return {
        "disclaimer": DISCLAIMER,
        "model": str(predictions.model_dir) if predictions.model_dir is not None else None,
        "device": predictions.device,
        "thresholds": {
            "rule": "flagged when probability >= threshold",
            "source": thresholds.describe(),
            "method": thresholds.method,
            "per_finding": dict(thresholds.values),
            "defaulted": list(thresholds.defaulted),
        },
        "labels": list(LABELS),
        "predictions": [
            {
                "path": str(path),
                "image": Path(path).name,
                "probabilities": {name: float(p) for name, p in zip(LABELS, row, strict=True)},
                "flagged": list(flagged),
            }
            for path, row, flagged in zip(
                predictions.paths, predictions.probabilities, predictions.flagged, strict=True
            )
        ],
        "failed": [{"path": str(f.path), "problem": f.problem} for f in predictions.failures],
    }


def write_predictions(predictions: Predictions, out: Path) -> Path:
    """Write CSV or JSON by `out`'s extension (see the module doc); returns `out`."""
    if output_format(out) == "csv":
        text = format_csv(predictions)
    else:
        text = json.dumps(predictions_json(predictions), indent=2, ensure_ascii=False) + "\n"
    return write_text(out, text)


def real_labels(label_table: pd.DataFrame, paths: Sequence[Path]) -> dict[Path, list[str] | None]:
    """Each path's labels in an NIH label table (`read_label_file`'s), None for a path it does not list.

    Matched on the file name (``Image Index``), else on the name without its extension, so that
    ``00000001_000.dcm`` finds ``00000001_000.png``. Labels in LABELS order ("No Finding" included).
    """
    values = label_table[list(LABELS)].to_numpy()
    names = [[label for label, v in zip(LABELS, row, strict=True) if v] for row in values]
    by_name = dict(zip(label_table["image"], names, strict=True))
    by_stem = {Path(image).stem: labels for image, labels in by_name.items()}
    return {Path(p): by_name.get(Path(p).name, by_stem.get(Path(p).stem)) for p in paths}


def grid_titles(predictions: Predictions, real: dict[Path, list[str] | None] | None = None) -> list[str]:
    """One title per predicted image, the guide's "Prediction: … | Real: …" (Real only with a label file)."""
    titles = []
    for path, flagged in zip(predictions.paths, predictions.flagged, strict=True):
        text = f"Prediction: {', '.join(flagged) or 'none flagged'}"
        if real is not None:
            labels = real.get(Path(path))
            text += f" | Real: {', '.join(labels) if labels is not None else 'not in the label file'}"
        titles.append(text)
    return titles


def prediction_grid_figure(
    predictions: Predictions, *, n: int = 3, label_table: pd.DataFrame | None = None
) -> Figure:
    """An n x n figure of the first n*n predicted images, each titled with its file name and `grid_titles`.

    `label_table` (from `xraycls.data.labels.read_label_file`) gives the "Real: …" part. Tiles show the image
    as the model read it (`read_image`, at `GRID_DISPLAY_SIZE` pixels). The figure's title carries
    `DISCLAIMER` and the flagging rule. ValueError when nothing was predicted or n < 1.
    """
    from matplotlib.figure import Figure

    from xraycls.inference.readers import read_image

    if n < 1:
        raise ValueError(f"grid size must be >= 1, got {n}")
    count = min(n * n, len(predictions.paths))
    if count == 0:
        raise ValueError("grid: no image was predicted, nothing to show")
    paths = list(predictions.paths[:count])
    real = real_labels(label_table, paths) if label_table is not None else None
    titles = grid_titles(predictions, real)[:count]
    columns = min(n, count)
    rows = -(-count // columns)
    # Constrained layout makes room for long titles (a weak model may flag many findings) and the header.
    fig = Figure(figsize=(3.6 * columns, 4.4 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, path, title in zip(axes, paths, titles, strict=False):
        ax.imshow(read_image(path, GRID_DISPLAY_SIZE), cmap="gray", vmin=0, vmax=255)
        wrapped = "\n".join(textwrap.wrap(title, width=36))
        ax.set_title(f"{Path(path).name}\n{wrapped}", fontsize=8)
    rule = textwrap.fill(f"Flagged: probability >= threshold; {predictions.thresholds.describe()}", 110)
    fig.suptitle(f"{DISCLAIMER}\n{rule}", fontsize=9, color="darkred")
    return fig


def plot_prediction_grid(
    predictions: Predictions, out: Path, *, n: int = 3, label_table: pd.DataFrame | None = None
) -> Path:
    """Write `prediction_grid_figure` as a PNG at `out`; returns `out`."""
    fig = prediction_grid_figure(predictions, n=n, label_table=label_table)
    return save_png(fig, out, dpi=100, bbox_inches="tight")  # Agg on this figure only: no pyplot state
