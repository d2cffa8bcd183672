"""What a prediction job returns: the operating `Thresholds`, each unread file's `Failure`, the `Predictions`.

Types shared by `xraycls.inference.predict` (which makes them) and `xraycls.inference.outputs` (which
writes them); they live here so that neither of those modules imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xraycls.findings import FINDINGS, LABELS
from xraycls.inference.thresholds import flag_findings

__all__ = ["DEFAULT_THRESHOLD", "Thresholds", "Failure", "Predictions"]

DEFAULT_THRESHOLD = 0.5  # for a finding the model stores no operating threshold for


@dataclass(frozen=True)
class Thresholds:
    """One operating threshold per finding (the 14 `FINDINGS`; "No Finding" is not a finding to flag).

    The flagging rule is `xraycls.inference.thresholds.flag_findings`: probability >= threshold; a finding
    whose threshold is None (no ROC curve on validation) is never flagged.
    """

    values: dict[str, float | None]  # finding -> threshold in [0, 1], or None
    method: str  # how they were chosen, as stored (e.g. "youden"), or "none saved"
    defaulted: tuple[str, ...]  # findings at DEFAULT_THRESHOLD because the model stores none for them

    def describe(self) -> str:
        """One line for output headers: where the thresholds come from."""
        if len(self.defaulted) == len(FINDINGS):
            return f"threshold {DEFAULT_THRESHOLD} for every finding (the model stores no thresholds)"
        text = f"per-finding thresholds from the model ({self.method})"
        if self.defaulted:
            text += f"; {DEFAULT_THRESHOLD} for {', '.join(self.defaulted)} (none stored)"
        never = [name for name, value in self.values.items() if value is None]
        if never:
            text += f"; never flagged: {', '.join(never)} (no threshold could be chosen)"
        return text

    def flag(self, probabilities: np.ndarray) -> list[list[str]]:
        """float [N, 15] probabilities (LABELS order) -> per row, the flagged findings in FINDINGS order."""
        probabilities = np.asarray(probabilities)
        if probabilities.ndim != 2 or probabilities.shape[1] != len(LABELS):
            shape = list(probabilities.shape)
            raise ValueError(f"probabilities must be [N, {len(LABELS)}] (LABELS order), got {shape}")
        columns = [LABELS.index(name) for name in FINDINGS]
        return flag_findings(probabilities[:, columns], self.values, label_names=FINDINGS)


@dataclass(frozen=True)
class Failure:
    """An input that was not predicted, and why (one line)."""

    path: Path
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


@dataclass
class Predictions:
    """What `predict_files` returns; rows follow the input order, failed files left out."""

    paths: list[Path]  # one per predicted image
    probabilities: np.ndarray  # float32 [N, 15], columns in `labels` order
    flagged: list[list[str]]  # per image, the findings at or above their threshold, in FINDINGS order
    thresholds: Thresholds
    device: str
    model_dir: Path | None = None
    failures: list[Failure] = field(default_factory=list)
    labels: list[str] = field(default_factory=lambda: list(LABELS))
    heatmaps: list[Path] = field(default_factory=list)  # overlay PNGs written, if any were asked for
