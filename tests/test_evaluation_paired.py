"""Paired comparison: fast DeLong against its definition, the paired bootstrap, and refusal of
different image sets."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from xraycls.evaluation.paired import (
    align_images,
    compare_models,
    delong_components,
    delong_test,
    paired_bootstrap,
)
from xraycls.findings import LABELS, NUM_LABELS


def _direct_components(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's definition: psi(x, y) = 1 if x > y, 1/2 if x == y, 0 otherwise, over every pair."""
    x, y = scores[positive], scores[~positive]
    psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
    return psi.mean(axis=1), psi.mean(axis=0)


def _direct_test(a: np.ndarray, b: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """(difference, variance) from the direct components and DeLong's covariance formula."""
    a10, a01 = _direct_components(a, positive)
    b10, b01 = _direct_components(b, positive)
    m, n = a10.size, a01.size
    s10, s01 = np.cov(np.stack([a10, b10])), np.cov(np.stack([a01, b01]))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    return b10.mean() - a10.mean(), var


FIXED_A = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.9, 0.2, 0.65, 0.4, 0.05, 0.7, 0.55])
FIXED_B = np.array([0.3, 0.2, 0.6, 0.9, 0.5, 0.5, 0.1, 0.8, 0.5, 0.2, 0.95, 0.4])
FIXED_Y = np.array([0, 1, 0, 1, 0, 1, 0, 1, 1, 0, 1, 0], dtype=bool)


def test_fast_delong_components_equal_the_definition() -> None:
    for scores in (FIXED_A, FIXED_B):  # both with ties, within and across classes
        fast10, fast01 = delong_components(scores, FIXED_Y)
        slow10, slow01 = _direct_components(scores, FIXED_Y)
        np.testing.assert_allclose(fast10, slow10, atol=1e-15)
        np.testing.assert_allclose(fast01, slow01, atol=1e-15)
        assert fast10.mean() == pytest.approx(roc_auc_score(FIXED_Y, scores), abs=1e-15)
    result = delong_test(FIXED_A, FIXED_B, FIXED_Y)
    diff, var = _direct_test(FIXED_A, FIXED_B, FIXED_Y)
    assert result["difference"] == pytest.approx(diff, abs=1e-15)
    assert result["se"] == pytest.approx(np.sqrt(var), abs=1e-15)
    assert result["interval"][0] < diff < result["interval"][1]
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.random(40) < 0.4
        a, b = np.round(rng.normal(size=40) + y, 1), np.round(rng.normal(size=40) + 0.5 * y, 1)
        diff, var = _direct_test(a, b, y)
        result = delong_test(a, b, y)
        assert result["difference"] == pytest.approx(diff, abs=1e-13)
        assert result["se"] == pytest.approx(np.sqrt(var), abs=1e-13)


def _two_models(n: int = 600, patients: int = 150, seed: int = 4) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    patient = rng.integers(0, patients, n)
    labels = (rng.random((n, NUM_LABELS)) < 0.3).astype(np.float32)
    noise = rng.normal(size=(n, NUM_LABELS))
    weak = (0.3 * labels + noise).astype(np.float32)
    strong = (1.5 * labels + noise + 0.3 * rng.normal(size=(n, NUM_LABELS))).astype(np.float32)
    return weak, strong, labels, patient


def test_paired_bootstrap_detects_a_better_model_and_not_an_identical_one() -> None:
    weak, strong, labels, patient = _two_models()
    result = paired_bootstrap(weak, strong, labels, patient, resamples=300, seed=0)
    macro = result["auroc_macro14"]
    assert macro["difference"] == pytest.approx(macro["b"] - macro["a"])
    assert 0 < macro["interval"][0] < macro["difference"] < macro["interval"][1]
    assert macro["p_value"] == pytest.approx(2 / 301)  # no replicate at or below zero
    assert set(result["auroc_per_finding"]) == set(LABELS)
    same = paired_bootstrap(weak, weak, labels, patient, resamples=100, seed=0)
    assert same["auroc_macro15"]["interval"] == [0.0, 0.0] and same["auroc_macro15"]["p_value"] == 1.0


def test_compare_models_aligns_rows_and_refuses_different_images() -> None:
    weak, strong, labels, patient = _two_models(n=200, patients=60)
    ids = np.array([f"{i:05d}.png" for i in range(len(labels))])
    order = np.random.default_rng(1).permutation(len(ids))
    shuffled = compare_models(ids, weak, ids[order], strong[order], labels, patient, resamples=50, seed=3)
    plain = compare_models(ids, weak, ids, strong, labels, patient, resamples=50, seed=3)
    assert shuffled == plain
    assert plain["delong"]["Atelectasis"]["difference"] == pytest.approx(
        plain["auroc_per_finding"]["Atelectasis"]["difference"], abs=1e-12
    )
    with pytest.raises(ValueError, match="same images.*1 only in A.*1 only in B"):
        compare_models(ids, weak, np.r_[ids[:-1], ["other.png"]], strong, labels, patient, resamples=5)
    with pytest.raises(ValueError, match="same images"):
        align_images(ids, ids[:-1])
    with pytest.raises(ValueError, match="repeat"):
        align_images(ids, np.r_[ids[:-1], ids[:1]])
