"""Operating thresholds: one probability cut-off per label, chosen on validation, and the flagging rule.

A label is flagged on an image when its probability is >= the label's threshold (a probability exactly at
the threshold is flagged). The candidate thresholds are the distinct probabilities the validation images
got for that label: each is one point of the label's ROC curve, with

    sensitivity = positives at or above t / positives,   specificity = negatives below t / negatives.

Methods (`choose_thresholds(method=...)`):

- ``"youden"`` (default): the candidate with the largest Youden's J = sensitivity + specificity - 1
  (Youden 1950). J is compared exactly (in integer counts), and a tie goes to the HIGHEST tied threshold:
  the most specific of the equally good points, so fewer images are flagged on equal evidence.
- ``"target_sensitivity"``: the highest candidate whose sensitivity is >= `target_sensitivity`, i.e. the
  most specific point that still finds at least that fraction of the validation positives. It always
  exists: the lowest candidate flags every positive (sensitivity 1).

A label without positives or without negatives among the validation images has no ROC curve: its
threshold is None, with a ``reason``, and `flag_findings` never flags it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from xraycls.findings import LABELS

__all__ = [
    "THRESHOLD_RULE",
    "THRESHOLD_METHODS",
    "check_threshold_settings",
    "choose_thresholds",
    "flag_findings",
]

log = logging.getLogger(__name__)

THRESHOLD_RULE = "flagged when probability >= threshold"

# Each method maps (true positives, true negatives, positives, negatives, target) at every candidate
# threshold (ascending) to the index of the chosen candidate.
_Chooser = Callable[[np.ndarray, np.ndarray, int, int, float | None], int]
_METHODS: dict[str, _Chooser] = {}


def _method(name: str) -> Callable[[_Chooser], _Chooser]:
    def register(chooser: _Chooser) -> _Chooser:
        _METHODS[name] = chooser
        return chooser

    return register


@_method("youden")
def _youden(tp: np.ndarray, tn: np.ndarray, positives: int, negatives: int, target: float | None) -> int:
    # J * positives * negatives = tp * negatives + tn * positives - positives * negatives: exact in integers,
    # so equal J values compare equal and the tie rule (highest threshold) is deterministic.
    scaled_j = tp * negatives + tn * positives
    best = np.flatnonzero(scaled_j == scaled_j.max())
    return int(best[-1])


@_method("target_sensitivity")
def _target(tp: np.ndarray, tn: np.ndarray, positives: int, negatives: int, target: float | None) -> int:
    assert target is not None  # checked by choose_thresholds
    # Sensitivity falls as the threshold rises; a tiny slack keeps e.g. 7/10 >= 0.7 true in floating point.
    reaching = np.flatnonzero(tp / positives >= target - 1e-12)
    return int(reaching[-1])


THRESHOLD_METHODS: tuple[str, ...] = tuple(_METHODS)


def _check_inputs(probs: Any, labels: Any, label_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    width = len(label_names)
    if probs.ndim != 2 or probs.shape[1] != width or labels.shape != probs.shape:
        raise ValueError(
            f"thresholds: probs {list(probs.shape)} and labels {list(labels.shape)} must both be "
            f"[images, {width}] (one column per label, in label_names order)"
        )
    if not np.all(np.isfinite(probs)) or probs.min(initial=0.0) < 0 or probs.max(initial=0.0) > 1:
        raise ValueError("thresholds: probs must be finite probabilities in [0, 1]")
    if not np.all((labels == 0) | (labels == 1)):
        bad = labels[~((labels == 0) | (labels == 1))][:5].tolist()
        raise ValueError(f"thresholds: labels must be 0 or 1, got values such as {bad}")
    return probs, labels.astype(bool)


def _one_label(scores: np.ndarray, positive: np.ndarray, method: str, target: float | None) -> dict:
    positives, negatives = int(positive.sum()), int((~positive).sum())
    result: dict[str, Any] = {"positives": positives, "negatives": negatives}
    if positives == 0 or negatives == 0:
        missing = "positive" if positives == 0 else "negative"
        reason = f"no {missing} images among the {len(scores)} used: no ROC curve to choose from"
        return {"threshold": None, "sensitivity": None, "specificity": None, **result, "reason": reason}
    candidates = np.unique(scores)  # ascending
    pos_sorted, neg_sorted = np.sort(scores[positive]), np.sort(scores[~positive])
    tp = positives - np.searchsorted(pos_sorted, candidates, side="left")  # positives with score >= t
    tn = np.searchsorted(neg_sorted, candidates, side="left")  # negatives with score < t
    index = _METHODS[method](tp, tn, positives, negatives, target)
    return {
        "threshold": float(candidates[index]),
        "sensitivity": float(tp[index] / positives),
        "specificity": float(tn[index] / negatives),
        **result,
    }


def check_threshold_settings(method: str, target_sensitivity: float | None = None) -> float | None:
    """Validate the ``thresholds`` settings before any work; returns the target as a float (or None).

    Raises ValueError naming the setting for an unknown method, a target outside (0, 1] with
    method=target_sensitivity, or a target given with another method (it would be silently ignored).
    """
    if method not in _METHODS:
        raise ValueError(f"thresholds.method={method!r} is unknown; choose one of {list(_METHODS)}")
    if method == "target_sensitivity":
        number = isinstance(target_sensitivity, (int, float)) and not isinstance(target_sensitivity, bool)
        if not number or not 0 < float(target_sensitivity) <= 1:
            raise ValueError(
                f"thresholds.target_sensitivity must be in (0, 1] with method=target_sensitivity, "
                f"got {target_sensitivity!r}"
            )
        return float(target_sensitivity)
    if target_sensitivity is not None:
        raise ValueError(
            f"thresholds.target_sensitivity={target_sensitivity!r} is only used with "
            f"method=target_sensitivity (method is {method!r}); set one or clear the other"
        )
    return None


def choose_thresholds(
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    method: str = "youden",
    target_sensitivity: float | None = None,
    label_names: Sequence[str] = LABELS,
) -> dict[str, Any]:
    """One threshold per label from validation probabilities and labels (float [N, L] each, 0/1 labels).

    Returns {"method", "target_sensitivity", "rule", "images", "per_finding": {label: {"threshold",
    "sensitivity", "specificity", "positives", "negatives"} (+ "reason" where the threshold is None)}},
    JSON-ready, labels in `label_names` order. Sensitivity and specificity are those the threshold gives on
    these images. Raises ValueError for an unknown method, a target outside (0, 1] or given with another
    method, and for inputs of the wrong shape or values.
    """
    target_sensitivity = check_threshold_settings(method, target_sensitivity)
    probs, positive = _check_inputs(probs, labels, label_names)
    per_finding = {
        name: _one_label(probs[:, j], positive[:, j], method, target_sensitivity)
        for j, name in enumerate(label_names)
    }
    skipped = [name for name, entry in per_finding.items() if entry["threshold"] is None]
    if skipped:
        log.warning(
            "thresholds: none for %s (no positives or no negatives among %d images)", skipped, len(probs)
        )
    return {
        "method": method,
        "target_sensitivity": target_sensitivity,
        "rule": THRESHOLD_RULE,
        "images": int(len(probs)),
        "per_finding": per_finding,
    }


def flag_findings(
    probs: np.ndarray, thresholds: Mapping[str, Any], label_names: Sequence[str] = LABELS
) -> list[list[str]]:
    """The labels flagged on each image: probability >= its threshold (None: never flagged).

    `probs` is float [N, L] in `label_names` order; `thresholds` is what `choose_thresholds` returned (or
    its ``per_finding`` mapping) and must name every label of `label_names`. Returns N lists of label
    names, each in `label_names` order.
    """
    per_finding = thresholds.get("per_finding", thresholds)
    missing = [name for name in label_names if name not in per_finding]
    if missing:
        raise ValueError(f"thresholds name no entry for {missing} (they have {sorted(per_finding)})")
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(label_names):
        raise ValueError(f"probs must be [images, {len(label_names)}], got {list(probs.shape)}")
    cut = np.array([_threshold_value(name, per_finding[name]) for name in label_names])
    flagged = probs >= cut  # a NaN cut (no threshold) is never reached
    return [[label_names[j] for j in np.flatnonzero(row)] for row in flagged]


def _threshold_value(name: str, entry: Any) -> float:
    value = entry.get("threshold") if isinstance(entry, Mapping) else entry
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"threshold of {name} must be a finite number or None, got {value!r}")
    return float(value)
