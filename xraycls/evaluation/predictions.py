"""A scored image set on disk: predictions.csv (`xraycls evaluate`) and predictions_test.csv (training runs).

Columns: ``image`` (file name, the key a paired comparison matches on), ``patient`` (patient id, the
bootstrap's sampling unit), the 15 probabilities named by label (`xraycls.findings.LABELS` order, sigmoid of
the logits, 9 significant digits so float32 values read back exactly), then the 15 labels as
``label_<name>`` (0/1). The first line is a ``#`` comment with `xraycls.disclaimer.DISCLAIMER`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from xraycls.disclaimer import DISCLAIMER
from xraycls.files import write_text
from xraycls.findings import LABELS

__all__ = ["ScoredImages", "LABEL_PREFIX", "write_scored_images", "read_scored_images"]

LABEL_PREFIX = "label_"


@dataclass
class ScoredImages:
    """One model's scores on one image set, row-aligned: images, patients [N]; probs, labels [N, 15]."""

    images: np.ndarray  # str
    patients: np.ndarray  # patient ids (int or str)
    probabilities: np.ndarray  # float32 [N, 15], LABELS order
    labels: np.ndarray  # float32 0/1 [N, 15]

    def __post_init__(self) -> None:
        n = len(self.images)
        shapes = {
            "patients": np.shape(self.patients),
            "probabilities": np.shape(self.probabilities),
            "labels": np.shape(self.labels),
        }
        expected = {"patients": (n,), "probabilities": (n, len(LABELS)), "labels": (n, len(LABELS))}
        if shapes != expected:
            raise ValueError(f"scored images: shapes {shapes} do not fit {n} images x {len(LABELS)} labels")


def write_scored_images(path: Path, scored: ScoredImages, note: str = "") -> Path:
    """Write `scored` as CSV (module doc) atomically; `note` is appended to the comment line."""
    table = pd.DataFrame({"image": np.asarray(scored.images, dtype=str), "patient": scored.patients})
    probs = pd.DataFrame(np.asarray(scored.probabilities, dtype=np.float64), columns=list(LABELS))
    labels = pd.DataFrame(
        np.asarray(scored.labels).round().astype(np.int64), columns=[LABEL_PREFIX + n for n in LABELS]
    )
    body = pd.concat([table, probs, labels], axis=1).to_csv(
        index=False, float_format="%.9g", lineterminator="\n"
    )
    return write_text(path, f"# {DISCLAIMER}{(' ' + note) if note else ''}\n{body}")


def read_scored_images(path: Path) -> ScoredImages:
    """Read a file written by `write_scored_images`; ValueError naming the file and the missing columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    table = pd.read_csv(path, skiprows=1, dtype={"image": str}, keep_default_na=False)
    needed: Sequence[str] = ["image", "patient", *LABELS, *(LABEL_PREFIX + n for n in LABELS)]
    missing = [column for column in needed if column not in table.columns]
    if missing:
        raise ValueError(f"{path}: not a predictions file, columns {missing[:5]} missing")
    try:
        probs = table[list(LABELS)].to_numpy(dtype=np.float32)
        labels = table[[LABEL_PREFIX + n for n in LABELS]].to_numpy(dtype=np.float32)
    except ValueError as err:
        raise ValueError(f"{path}: probabilities and labels must be numbers ({err})") from err
    if not np.isfinite(probs).all() or not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{path}: probabilities must be finite and labels 0/1")
    return ScoredImages(table["image"].to_numpy(dtype=str), table["patient"].to_numpy(), probs, labels)
