"""Point metrics and patient-level bootstrap intervals for AUROC and average precision.

Point estimates reproduce `xraycls.model.metrics.XrayMetrics` (logits rounded to float32 as it does;
``auroc_seed_compat`` = macro mean of the per-label AUROCs of the float32 softmax over the 15 logits;
a label lacking positives or negatives is NaN and left out of every macro), plus average precision per
label on the same scores.

Bootstrap: each resample draws as many patients as the test set holds, with replacement; all images of a
drawn patient come along (a patient drawn k times weighs k). Resample b uses draw b of
``np.random.default_rng(seed)``, so a given seed gives the same resamples for any model on the same images
(the paired comparison relies on this).

Degenerate resamples (documented rule): a label whose resample holds no positive or no negative has NaN
for that resample, and its interval uses the remaining resamples. A macro mean is taken over the labels
defined on the full test set; if any of them is NaN in a resample, the macro is NaN there (skipped), so
every macro replicate averages the same labels. ``degenerate_resamples`` counts the NaN resamples per
label and per macro.

Methods: ``percentile`` (quantiles of the valid replicates) and ``bca`` (bias-corrected and accelerated,
Efron 1987, acceleration from the leave-one-patient-out jackknife; the bias proportion is clipped to
[1/(2B), 1 - 1/(2B)] so an interval exists even when every replicate falls on one side).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm

from xraycls.evaluation._kernels import RankedLabel, weighted_scores
from xraycls.findings import FINDINGS, LABELS

__all__ = [
    "MACROS",
    "Replicates",
    "ScoredSet",
    "prepare_inputs",
    "point_metrics",
    "resample_counts",
    "replicates",
    "interval",
    "confidence_intervals",
]

MACROS = ("auroc_macro14", "auroc_macro15", "auroc_seed_compat")
_BLOCK = 64  # resamples per kernel call: a [images, 64] int32 block stays within a few MB of cache


def prepare_inputs(
    logits: np.ndarray, labels: np.ndarray, label_names: Sequence[str] = LABELS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float32 logits [N, L], float32 softmax of them [N, L], both as float64; positive [N, L] bool)."""
    logits32 = torch.as_tensor(np.asarray(logits), dtype=torch.float32)
    labels = np.asarray(labels)
    if logits32.ndim != 2 or logits32.shape != labels.shape or logits32.shape[1] != len(label_names):
        raise ValueError(
            f"logits {tuple(logits32.shape)} and labels {labels.shape} must both be "
            f"[images, {len(label_names)}]"
        )
    softmax = torch.softmax(logits32, dim=1).double().numpy()
    return logits32.double().numpy(), softmax, labels > 0.5


def _unit_index(units: np.ndarray | None, n: int) -> np.ndarray:
    """Patient ids (any hashable values) -> 0..P-1; None -> one unit per image."""
    if units is None:
        return np.arange(n)
    units = np.asarray(units)
    if units.shape != (n,):
        raise ValueError(f"patients has shape {units.shape}, expected ({n},): one id per image")
    return np.unique(units, return_inverse=True)[1].reshape(n)


@dataclass
class Replicates:
    """Per-resample values: ``auroc``, ``ap``, ``auroc_softmax`` [R, L]; each macro in `MACROS` [R]."""

    auroc: np.ndarray
    ap: np.ndarray
    auroc_softmax: np.ndarray
    macros: dict[str, np.ndarray]


def _evaluate(
    ranked: list[RankedLabel], ranked_softmax: list[RankedLabel], macro_cols: dict, blocks: Iterator
) -> Replicates:
    aurocs, aps, softs = [], [], []
    for counts in blocks:
        per_label = [weighted_scores(r, counts) for r in ranked]
        aurocs.append(np.stack([a for a, _ in per_label], axis=1))
        aps.append(np.stack([p for _, p in per_label], axis=1))
        softs.append(np.stack([weighted_scores(r, counts, False)[0] for r in ranked_softmax], axis=1))
    auroc, ap, soft = (np.concatenate(x) for x in (aurocs, aps, softs))
    sources = {"auroc_macro14": auroc, "auroc_macro15": auroc, "auroc_seed_compat": soft}
    return Replicates(auroc, ap, soft, {key: _macro(sources[key], macro_cols[key]) for key in MACROS})


def _macro(values: np.ndarray, cols: np.ndarray) -> np.ndarray:
    # Plain mean: NaN in any of the fixed labels makes the resample's macro NaN (the documented rule).
    return values[:, cols].mean(axis=1) if cols.size else np.full(values.shape[0], np.nan)


class ScoredSet:
    """One model on one test set, each label sorted once; ``point`` holds the full-set values as 1-row
    `Replicates`, `run(blocks)` scores resample count blocks [units, b] (see `resample_counts`).
    """

    def __init__(
        self,
        logits: np.ndarray,
        labels: np.ndarray,
        patients: np.ndarray | None,
        label_names: Sequence[str] = LABELS,
    ) -> None:
        scores, softmax, positive = prepare_inputs(logits, labels, label_names)
        self.label_names = tuple(label_names)
        self.units = _unit_index(patients, scores.shape[0])
        self.n_units = int(self.units.max()) + 1 if self.units.size else 0
        cols = range(scores.shape[1])
        self.ranked = [RankedLabel(scores[:, j], positive[:, j], self.units) for j in cols]
        self.ranked_softmax = [RankedLabel(softmax[:, j], positive[:, j], self.units) for j in cols]
        ones = np.ones((self.n_units, 1), dtype=np.int32)
        defined = np.array([not np.isnan(weighted_scores(r, ones, False)[0][0]) for r in self.ranked])
        findings = np.array([name in FINDINGS for name in self.label_names])
        self.macro_cols = {
            "auroc_macro14": np.flatnonzero(defined & findings),
            "auroc_macro15": np.flatnonzero(defined),
            "auroc_seed_compat": np.flatnonzero(defined),
        }
        self.point = _evaluate(self.ranked, self.ranked_softmax, self.macro_cols, iter([ones]))

    def run(self, blocks: Iterator) -> Replicates:
        return _evaluate(self.ranked, self.ranked_softmax, self.macro_cols, blocks)


def point_metrics(logits: np.ndarray, labels: np.ndarray, label_names: Sequence[str] = LABELS) -> dict:
    """XrayMetrics' AUROC keys plus ``average_precision_per_finding``; floats (NaN where undefined)."""
    return _point_dict(ScoredSet(logits, labels, None, label_names))


def _point_dict(scored: ScoredSet) -> dict:
    point, names = scored.point, scored.label_names
    return {
        **{key: float(point.macros[key][0]) for key in MACROS},
        "auroc_per_finding": dict(zip(names, map(float, point.auroc[0]), strict=True)),
        "average_precision_per_finding": dict(zip(names, map(float, point.ap[0]), strict=True)),
    }


def resample_counts(n_units: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of [n_units, <=64] int32 counts: column b = how often each unit is drawn in resample b."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, _BLOCK):
        size = min(_BLOCK, resamples - start)
        block = np.empty((n_units, size), dtype=np.int32)
        for k in range(size):
            block[:, k] = np.bincount(rng.integers(0, n_units, n_units), minlength=n_units)
        yield block


def _jackknife_counts(n_units: int) -> Iterator[np.ndarray]:
    for start in range(0, n_units, _BLOCK):
        size = min(_BLOCK, n_units - start)
        block = np.ones((n_units, size), dtype=np.int32)
        block[start + np.arange(size), np.arange(size)] = 0
        yield block


def replicates(
    logits: np.ndarray,
    labels: np.ndarray,
    patients: np.ndarray | None,
    resamples: int,
    seed: int,
    label_names: Sequence[str] = LABELS,
) -> tuple[Replicates, Replicates]:
    """(point values as 1-row `Replicates`, bootstrap `Replicates` with `resamples` rows)."""
    scored = ScoredSet(logits, labels, patients, label_names)
    return scored.point, scored.run(resample_counts(scored.n_units, resamples, seed))


def interval(
    boot: np.ndarray,
    level: float,
    method: str = "percentile",
    point: float = np.nan,
    jack: np.ndarray | None = None,
) -> tuple[float, float]:
    """(lo, hi) from the valid (non-NaN) values of `boot` [R]; NaN when none is valid.

    ``bca`` needs the `point` estimate and the jackknife values `jack` [units] (NaN ones are dropped).
    """
    valid = boot[~np.isnan(boot)]
    if valid.size == 0 or (method == "bca" and np.isnan(point)):
        return (np.nan, np.nan)
    alpha = (1.0 - level) / 2.0
    quantiles = np.array([alpha, 1.0 - alpha])
    if method == "bca":
        share = (np.sum(valid < point) + 0.5 * np.sum(valid == point)) / valid.size
        share = np.clip(share, 0.5 / valid.size, 1.0 - 0.5 / valid.size)
        z0 = norm.ppf(share)
        jack = np.asarray(jack if jack is not None else [], dtype=float)
        jack = jack[~np.isnan(jack)]
        dev = jack.mean() - jack if jack.size else np.zeros(1)
        denom = 6.0 * np.sum(dev**2) ** 1.5
        accel = np.sum(dev**3) / denom if denom > 0 else 0.0
        z = norm.ppf(quantiles)
        quantiles = norm.cdf(z0 + (z0 + z) / (1.0 - accel * (z0 + z)))
    elif method != "percentile":
        raise ValueError(f"interval method {method!r}: expected 'percentile' or 'bca'")
    lo, hi = np.quantile(valid, quantiles)
    return (float(lo), float(hi))


def _json(pair: tuple[float, float]) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in pair]


def confidence_intervals(
    logits: np.ndarray,
    labels: np.ndarray,
    patients: np.ndarray | None,
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    method: str = "percentile",
    label_names: Sequence[str] = LABELS,
) -> dict:
    """The ``ci`` block (module doc): [lo, hi] per metric, None where undefined; `patients` None = images."""
    if method not in ("percentile", "bca"):
        raise ValueError(f"interval method {method!r}: expected 'percentile' or 'bca'")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    scored = ScoredSet(logits, labels, patients, label_names)
    boot = scored.run(resample_counts(scored.n_units, resamples, seed))
    point = scored.point
    jack = scored.run(_jackknife_counts(scored.n_units)) if method == "bca" else None

    def one(kind: str, j: int | None) -> list[float | None]:
        if j is None:
            b, p = boot.macros[kind], point.macros[kind][0]
            jk = jack.macros[kind] if jack else None
        else:
            b, p = getattr(boot, kind)[:, j], getattr(point, kind)[0, j]
            jk = getattr(jack, kind)[:, j] if jack else None
        return _json(interval(b, level, method, p, jk))

    names = scored.label_names
    degenerate = {name: int(np.isnan(boot.auroc[:, j]).sum()) for j, name in enumerate(names)}
    degenerate.update({key: int(np.isnan(boot.macros[key]).sum()) for key in MACROS})
    return {
        "level": float(level),
        "unit": "patient" if patients is not None else "image",
        "resamples": int(resamples),
        "seed": int(seed),
        "method": method,
        **{key: one(key, None) for key in MACROS},
        "auroc_per_finding": {name: one("auroc", j) for j, name in enumerate(names)},
        "average_precision_per_finding": {name: one("ap", j) for j, name in enumerate(names)},
        "degenerate_resamples": degenerate,
    }
