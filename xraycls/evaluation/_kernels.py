"""Weighted AUROC and average precision of many resamples at once, from one sort per label.

A bootstrap resample is a count per sampling unit (patient or image); every image of a unit carries that
count as an integer weight. With integer weights, AUROC is the weighted Mann-Whitney statistic (a tie
between a positive and a negative counts one half, i.e. midranks) and average precision is scikit-learn's
step-wise sum over distinct thresholds; both equal scikit-learn on the rows repeated by their weights.

Each label is sorted once (`RankedLabel`); a block of resamples is then a [units, block] count matrix
whose rows are gathered per image and cumulated along the sorted order. Counts and cumulative counts
stay integers, so the AUROC numerator is exact; the only rounding is the final division.
"""

from __future__ import annotations

import numpy as np

__all__ = ["RankedLabel", "weighted_scores"]


class RankedLabel:
    """One label's scores sorted once: the unit of each positive and negative, and where ties fall.

    `scores` [N] float, `positive` [N] bool, `units` [N] int in [0, U) (the sampling unit of each image).
    """

    def __init__(self, scores: np.ndarray, positive: np.ndarray, units: np.ndarray) -> None:
        order = np.argsort(scores, kind="stable")
        ranked, is_pos, ranked_units = scores[order], positive[order], units[order]
        pos_scores, neg_scores = ranked[is_pos], ranked[~is_pos]
        self.pos_units = ranked_units[is_pos]
        self.neg_units = ranked_units[~is_pos]
        # Per positive (ascending): negatives below / at most its score, positives strictly below it.
        self.neg_below = np.searchsorted(neg_scores, pos_scores, side="left")
        neg_upto = np.searchsorted(neg_scores, pos_scores, side="right")
        self.pos_below = np.searchsorted(pos_scores, pos_scores, side="left")
        self.tied = np.flatnonzero(neg_upto != self.neg_below)
        self.max_unit_size = int(np.bincount(units).max()) if units.size else 0
        self.neg_upto_tied = neg_upto[self.tied]


def _cumulate(weights: np.ndarray, dtype: type) -> np.ndarray:
    """[n, B] -> [n + 1, B] running sums with a leading zero row (row k = sum of the first k)."""
    out = np.zeros((weights.shape[0] + 1, weights.shape[1]), dtype=dtype)
    # Same dtype in and out: numpy's cumsum is ~25x slower when it has to cast.
    np.cumsum(weights.astype(dtype, copy=False), axis=0, dtype=dtype, out=out[1:])
    return out


def weighted_scores(
    ranked: RankedLabel, counts: np.ndarray, average_precision: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """AUROC [B] and average precision [B] (or None) of one label under each column of `counts` [U, B].

    A column whose resample holds no positive or no negative weight gives NaN for both.
    """
    # int32 sums are exact while a resample's total weight fits; it is at most column sum x largest unit.
    bound = int(counts.sum(axis=0, dtype=np.int64).max(initial=0)) * ranked.max_unit_size
    acc = np.int32 if bound < 2**31 else np.int64
    # A count times a cumulative count: int32 too where it fits (~4x faster than casting to int64).
    prod = np.int32 if bound * int(counts.max(initial=0)) < 2**31 else np.int64
    pos_w = counts[ranked.pos_units].astype(acc, copy=False)  # [npos, B]
    neg_cum = _cumulate(counts[ranked.neg_units], acc)  # [nneg + 1, B]
    neg_total = neg_cum[-1].astype(np.int64)
    pos_cum = _cumulate(pos_w, acc) if average_precision else None
    pos_total = pos_cum[-1].astype(np.int64) if pos_cum is not None else pos_w.sum(axis=0, dtype=np.int64)
    below = neg_cum[ranked.neg_below]  # weighted negatives strictly below each positive
    # Twice the Mann-Whitney numerator: 2 * below + ties, kept in integers.
    twice = 2 * np.multiply(pos_w, below, dtype=prod).sum(axis=0, dtype=np.int64)
    if ranked.tied.size:
        tie_neg = neg_cum[ranked.neg_upto_tied] - below[ranked.tied]
        twice += np.multiply(pos_w[ranked.tied], tie_neg, dtype=prod).sum(axis=0, dtype=np.int64)
    pairs = pos_total * neg_total
    valid = pairs > 0
    auroc = np.full(counts.shape[1], np.nan)
    np.divide(twice, 2 * pairs, out=auroc, where=valid)
    if pos_cum is None:
        return auroc, None
    # Precision at each positive's threshold (weight with score >= it); recall steps by its own weight.
    pos_at_or_above = pos_total - pos_cum[ranked.pos_below]
    at_or_above = pos_at_or_above + (neg_total - below)
    precision = np.zeros(pos_at_or_above.shape)
    np.divide(pos_at_or_above, at_or_above, out=precision, where=at_or_above > 0)
    ap = np.full(counts.shape[1], np.nan)
    np.divide((pos_w * precision).sum(axis=0), pos_total, out=ap, where=valid)
    return auroc, ap
