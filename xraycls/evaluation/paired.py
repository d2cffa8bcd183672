"""Paired comparison of two models scored on the same images: patient bootstrap and DeLong's test.

Paired bootstrap: both models are scored under the same resample counts (`resample_counts` with one
seed), so each replicate of the difference B - A keeps the correlation between the models. Interval:
percentile of the valid differences (a resample where a label is degenerate is NaN for both models and
skipped; macros follow the rule of `xraycls.evaluation.bootstrap`). Two-sided p-value of "no difference":
p = min(1, 2 * min(#{d <= 0} + 1, #{d >= 0} + 1) / (R + 1)) over the R valid replicates d, i.e. the
smallest 1 - level whose percentile interval excludes 0, with the +1 that keeps p above zero.

DeLong's test (DeLong, DeLong & Clarke-Pearson 1988), fast algorithm of Sun & Xu (2014) from midranks:
per finding, the AUROC difference, its standard error, z and two-sided p. It treats images as independent
(it knows no patients), so on follow-up-rich test sets it is optimistic next to the patient bootstrap.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import norm, rankdata

from xraycls.evaluation.bootstrap import MACROS, ScoredSet, prepare_inputs, resample_counts
from xraycls.findings import LABELS

__all__ = [
    "align_images",
    "delong_components",
    "delong_test",
    "paired_bootstrap",
    "compare_models",
]


def align_images(ids_a: Sequence, ids_b: Sequence) -> np.ndarray:
    """Row index into B such that ``ids_b[index] == ids_a``; ValueError when the image sets differ."""
    ids_a, ids_b = np.asarray(ids_a), np.asarray(ids_b)
    for name, ids in (("A", ids_a), ("B", ids_b)):
        if len(np.unique(ids)) != len(ids):
            raise ValueError(f"model {name}'s images repeat: an image may be scored once per model")
    only_a, only_b = np.setdiff1d(ids_a, ids_b), np.setdiff1d(ids_b, ids_a)
    if only_a.size or only_b.size:
        raise ValueError(
            "a paired comparison needs both models scored on the same images; "
            f"{only_a.size} only in A (e.g. {only_a[:3].tolist()}), "
            f"{only_b.size} only in B (e.g. {only_b[:3].tolist()})"
        )
    order_b = np.argsort(ids_b)
    return order_b[np.searchsorted(ids_b[order_b], ids_a)]


def _p_value(diffs: np.ndarray) -> float:
    valid = diffs[~np.isnan(diffs)]
    if valid.size == 0:
        return float("nan")
    tail = min(np.sum(valid <= 0) + 1, np.sum(valid >= 0) + 1)
    return float(min(1.0, 2.0 * tail / (valid.size + 1)))


def _summary(a: float, b: float, diffs: np.ndarray, level: float) -> dict:
    valid = diffs[~np.isnan(diffs)]
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(valid, [alpha, 1.0 - alpha]) if valid.size else (np.nan, np.nan)
    return {
        "a": _num(a),
        "b": _num(b),
        "difference": _num(b - a),
        "interval": [_num(lo), _num(hi)],
        "p_value": _num(_p_value(diffs)),
        "degenerate_resamples": int(diffs.size - valid.size),
    }


def _num(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def paired_bootstrap(
    logits_a: np.ndarray,
    logits_b: np.ndarray,
    labels: np.ndarray,
    patients: np.ndarray | None,
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    label_names: Sequence[str] = LABELS,
) -> dict:
    """B - A per label (AUROC, AP) and per macro; rows of both logits must be the same images, in order."""
    scored_a = ScoredSet(logits_a, labels, patients, label_names)
    scored_b = ScoredSet(logits_b, labels, patients, label_names)
    blocks = list(resample_counts(scored_a.n_units, resamples, seed))
    boot_a, boot_b = scored_a.run(iter(blocks)), scored_b.run(iter(blocks))
    pa, pb = scored_a.point, scored_b.point
    out: dict = {
        "level": float(level),
        "unit": "patient" if patients is not None else "image",
        "resamples": int(resamples),
        "seed": int(seed),
        "method": "percentile",
    }
    for key in MACROS:
        # Macros use A's set of defined labels for both models (the labels are the same rows).
        diffs = boot_b.macros[key] - boot_a.macros[key]
        out[key] = _summary(pa.macros[key][0], pb.macros[key][0], diffs, level)
    for key, field in (("auroc_per_finding", "auroc"), ("average_precision_per_finding", "ap")):
        point_a, point_b = getattr(pa, field)[0], getattr(pb, field)[0]
        diffs = getattr(boot_b, field) - getattr(boot_a, field)
        out[key] = {
            name: _summary(point_a[j], point_b[j], diffs[:, j], level) for j, name in enumerate(label_names)
        }
    return out


def delong_components(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components from midranks (Sun & Xu 2014): V10 [positives], V01 [negatives].

    V10_i = mean over negatives j of psi(x_i, y_j), V01_j = mean over positives i of psi(x_i, y_j),
    psi = 1 if x > y, 1/2 if equal, 0 otherwise; their means are both the AUROC.
    """
    x, y = scores[positive], scores[~positive]
    m, n = x.size, y.size
    tz = rankdata(np.concatenate([x, y]))
    v10 = (tz[:m] - rankdata(x)) / n
    v01 = 1.0 - (tz[m:] - rankdata(y)) / m
    return v10, v01


def delong_test(
    scores_a: np.ndarray, scores_b: np.ndarray, positive: np.ndarray, level: float = 0.95
) -> dict:
    """DeLong's test of AUROC_B - AUROC_A for one label: difference, interval, standard error, z, p."""
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return {"difference": None, "interval": [None, None], "se": None, "z": None, "p_value": None}
    a10, a01 = delong_components(np.asarray(scores_a, dtype=float), positive)
    b10, b01 = delong_components(np.asarray(scores_b, dtype=float), positive)
    with warnings.catch_warnings():  # one positive or one negative: no variance, NaN made 0 below
        warnings.simplefilter("ignore", RuntimeWarning)
        s10, s01 = np.cov(np.stack([a10, b10])), np.cov(np.stack([a01, b01]))
    cov = np.nan_to_num(s10) / a10.size + np.nan_to_num(s01) / a01.size  # one image: no variance
    var = cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1]
    diff = b10.mean() - a10.mean()
    se = float(np.sqrt(max(var, 0.0)))
    if se > 0:
        z = diff / se
        p = float(2.0 * norm.sf(abs(z)))
    else:
        z, p = np.nan, (1.0 if diff == 0 else np.nan)
    half = norm.ppf(0.5 + level / 2.0) * se
    return {
        "difference": _num(diff),
        "interval": [_num(diff - half), _num(diff + half)],
        "se": se,
        "z": _num(z),
        "p_value": _num(p),
    }


def compare_models(
    ids_a: Sequence,
    logits_a: np.ndarray,
    ids_b: Sequence,
    logits_b: np.ndarray,
    labels: np.ndarray,
    patients: np.ndarray | None,
    **settings: Any,
) -> dict:
    """`paired_bootstrap` (its keyword `settings`: resamples, seed, level, label_names) plus ``delong``
    {label: `delong_test`}; `labels` and `patients` follow A's rows.

    B's rows are reordered to A's image order; different image sets raise ValueError (`align_images`).
    """
    logits_b = np.asarray(logits_b)[align_images(ids_a, ids_b)]
    out = paired_bootstrap(logits_a, logits_b, labels, patients, **settings)
    label_names = settings.get("label_names", LABELS)
    scores_a, _, positive = prepare_inputs(logits_a, labels, label_names)
    scores_b, _, _ = prepare_inputs(logits_b, labels, label_names)
    out["delong"] = {
        name: delong_test(scores_a[:, j], scores_b[:, j], positive[:, j], settings.get("level", 0.95))
        for j, name in enumerate(label_names)
    }
    return out
