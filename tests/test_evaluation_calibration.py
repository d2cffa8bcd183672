"""Calibration: ECE and reliability data on hand-computed inputs, temperature scaling recovers a known
temperature, and mapped thresholds flag the same images."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit

from xraycls.evaluation.calibration import (
    apply_temperatures,
    calibration_report,
    expected_calibration_error,
    fit_temperatures,
    map_thresholds,
    plot_reliability,
    reliability,
)
from xraycls.findings import LABELS, NUM_LABELS


def test_ece_and_reliability_by_hand() -> None:
    # 4 bins of width 0.25: [0.1, 0.2] -> bin 0 (mean 0.15, observed 1/2); [0.3] -> bin 1 (0.3, 0);
    # [0.8, 0.9, 1.0] -> bin 3 (mean 0.9, observed 2/3; 1.0 falls in the last bin).
    probs = np.array([0.1, 0.2, 0.3, 0.8, 0.9, 1.0])
    positive = np.array([1, 0, 0, 1, 1, 0])
    data = reliability(probs, positive, bins=4)
    assert data["edges"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert data["count"] == [2, 1, 0, 3]
    assert data["mean_predicted"][2] is None and data["observed"][2] is None
    np.testing.assert_allclose([data["mean_predicted"][i] for i in (0, 1, 3)], [0.15, 0.3, 0.9])
    np.testing.assert_allclose([data["observed"][i] for i in (0, 1, 3)], [0.5, 0.0, 2 / 3])
    expected = (2 * abs(0.15 - 0.5) + 1 * abs(0.3 - 0.0) + 3 * abs(0.9 - 2 / 3)) / 6
    assert expected_calibration_error(probs, positive, bins=4) == pytest.approx(expected, abs=1e-15)
    # Default 15 bins: 0.5 and 0.52 share bin 7 ([7/15, 8/15)), 0.05 is alone in bin 0.
    ece = expected_calibration_error(np.array([0.05, 0.5, 0.52]), np.array([0, 1, 0]))
    assert ece == pytest.approx((abs(0.05 - 0) + 2 * abs(0.51 - 0.5)) / 3, abs=1e-15)


def _simulated(temperature: float, n: int = 20_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """True logits z ~ N(0, 2^2), labels ~ Bernoulli(sigmoid(z)); the model reports z * temperature."""
    rng = np.random.default_rng(seed)
    z = 2.0 * rng.normal(size=(n, NUM_LABELS))
    labels = (rng.random(z.shape) < expit(z)).astype(np.float32)
    return z * temperature, labels


def test_temperature_scaling_recovers_a_known_temperature_and_keeps_flags() -> None:
    logits, labels = _simulated(temperature=2.5)
    temperatures = fit_temperatures(logits, labels)
    assert set(temperatures) == set(LABELS)
    np.testing.assert_allclose(list(temperatures.values()), 2.5, rtol=0.08)
    before = calibration_report(expit(logits), labels)
    after = calibration_report(apply_temperatures(logits, temperatures), labels)
    assert np.mean(list(after["ece"].values())) < 0.5 * np.mean(list(before["ece"].values()))

    test_logits, _ = _simulated(temperature=2.5, n=2_000, seed=1)
    rng = np.random.default_rng(2)
    thresholds = dict(zip(LABELS, rng.uniform(0.05, 0.95, NUM_LABELS).tolist(), strict=True))
    thresholds["Hernia"] = None
    mapped = map_thresholds(thresholds, temperatures)
    assert mapped["Hernia"] is None
    cut_before = np.array([np.nan if t is None else t for t in thresholds.values()])
    cut_after = np.array([np.nan if t is None else t for t in mapped.values()])
    flags_before = expit(test_logits) >= cut_before
    flags_after = apply_temperatures(test_logits, temperatures) >= cut_after
    assert flags_before.any() and (flags_before != flags_after).sum() == 0
    with pytest.raises(ValueError, match="no temperature"):
        apply_temperatures(test_logits, {"Atelectasis": 1.0})


def test_one_class_label_keeps_temperature_one_and_plot_writes_png(tmp_path) -> None:
    logits, labels = _simulated(temperature=1.0, n=500)
    labels[:, 13] = 0
    assert fit_temperatures(logits, labels)["Hernia"] == 1.0
    report = calibration_report(expit(logits), labels)
    path = plot_reliability(report["reliability"], tmp_path / "plots" / "reliability.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
