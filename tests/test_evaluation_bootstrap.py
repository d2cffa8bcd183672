"""Patient bootstrap: the vectorised kernels against scikit-learn on resampled rows, the point estimates
against XrayMetrics, the degenerate-resample rule, the ci block, and coverage on simulated test sets."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.metrics import average_precision_score, roc_auc_score

from xraycls.evaluation.bootstrap import (
    confidence_intervals,
    point_metrics,
    replicates,
    resample_counts,
)
from xraycls.findings import FINDINGS, LABELS, NUM_LABELS


def _fixed_set(n: int = 240, patients: int = 70, seed: int = 3) -> tuple[np.ndarray, ...]:
    """Logits rounded to 0.25 (many ties, also across classes); Hernia on one patient only, so it is
    degenerate in about 1/e of the resamples."""
    rng = np.random.default_rng(seed)
    patient = rng.integers(0, patients, n)
    labels = (rng.random((n, NUM_LABELS)) < rng.uniform(0.1, 0.5, NUM_LABELS)).astype(np.float32)
    labels[:, 13] = 0
    labels[patient == patient[0], 13] = 1
    logits = np.round(4 * (rng.normal(size=(n, NUM_LABELS)) + labels)) / 4
    return logits.astype(np.float32), labels, patient


def _slow(y: np.ndarray, x: np.ndarray, metric) -> float:
    return metric(y, x) if 0 < y.sum() < len(y) else math.nan


def test_vectorised_bootstrap_equals_sklearn_on_resampled_rows() -> None:
    logits, labels, patient = _fixed_set()
    resamples = 20
    _point, boot = replicates(logits, labels, patient, resamples, seed=5)
    softmax = torch.softmax(torch.from_numpy(logits), dim=1).double().numpy()
    units = np.unique(patient, return_inverse=True)[1]
    counts = np.concatenate(list(resample_counts(units.max() + 1, resamples, seed=5)), axis=1)
    assert counts.shape[1] == resamples and np.all(counts.sum(axis=0) == units.max() + 1)
    for b in range(resamples):
        rows = np.repeat(np.arange(len(patient)), counts[units, b])  # every image of a drawn patient
        y, x, s = labels[rows], logits[rows].astype(np.float64), softmax[rows]
        auroc = np.array([_slow(y[:, j], x[:, j], roc_auc_score) for j in range(NUM_LABELS)])
        ap = np.array([_slow(y[:, j], x[:, j], average_precision_score) for j in range(NUM_LABELS)])
        soft = np.array([_slow(y[:, j], s[:, j], roc_auc_score) for j in range(NUM_LABELS)])
        np.testing.assert_allclose(boot.auroc[b], auroc, rtol=0, atol=1e-12)
        np.testing.assert_allclose(boot.ap[b], ap, rtol=0, atol=1e-12)
        np.testing.assert_allclose(boot.auroc_softmax[b], soft, rtol=0, atol=1e-12)
        # Macro rule: plain mean over the (here all 15) labels defined on the full set, NaN if one is not.
        np.testing.assert_allclose(boot.macros["auroc_macro14"][b], auroc[:14].mean(), atol=1e-12)
        np.testing.assert_allclose(boot.macros["auroc_macro15"][b], auroc.mean(), atol=1e-12)
        np.testing.assert_allclose(boot.macros["auroc_seed_compat"][b], soft.mean(), atol=1e-12)
    assert np.isnan(boot.auroc[:, 13]).any(), "the fixture should make Hernia degenerate in some resamples"


def test_point_metrics_match_xray_metrics_and_sklearn() -> None:
    from xraycls.model.metrics import XrayMetrics

    logits, labels, _ = _fixed_set(seed=11)
    labels[:, 9] = 0  # Edema: no positives, NaN and left out of the macros as XrayMetrics does
    point = point_metrics(logits, labels)
    metrics = XrayMetrics()
    metrics.update(torch.from_numpy(logits), torch.from_numpy(labels))
    reference = metrics.compute()
    for key in ("auroc_macro14", "auroc_macro15", "auroc_seed_compat"):
        assert point[key] == pytest.approx(reference[key], abs=1e-6)  # torchmetrics computes in float32
    for name in LABELS:
        ref = reference["auroc_per_finding"][name]
        assert (math.isnan(ref) and math.isnan(point["auroc_per_finding"][name])) or point[
            "auroc_per_finding"
        ][name] == pytest.approx(ref, abs=1e-6)
    defined = [j for j in range(NUM_LABELS) if j != 9]
    exact = [roc_auc_score(labels[:, j], logits[:, j]) for j in defined]
    assert point["auroc_macro15"] == pytest.approx(np.mean(exact), abs=1e-12)
    assert point["auroc_macro14"] == pytest.approx(np.mean(exact[:13]), abs=1e-12)
    ap = average_precision_score(labels[:, 0], logits[:, 0])
    assert point["average_precision_per_finding"]["Atelectasis"] == pytest.approx(ap, abs=1e-12)


def test_ci_block_shape_degenerate_counts_and_json() -> None:
    logits, labels, patient = _fixed_set()
    ci = confidence_intervals(logits, labels, patient, resamples=200, seed=1)
    assert {k: ci[k] for k in ("level", "unit", "resamples", "seed", "method")} == {
        "level": 0.95, "unit": "patient", "resamples": 200, "seed": 1, "method": "percentile",
    }  # fmt: skip
    assert set(ci["auroc_per_finding"]) == set(LABELS) == set(ci["average_precision_per_finding"])
    point = point_metrics(logits, labels)
    for key in ("auroc_macro14", "auroc_macro15", "auroc_seed_compat"):
        lo, hi = ci[key]
        assert lo <= point[key] <= hi
    hernia = ci["degenerate_resamples"]["Hernia"]
    assert 0 < hernia < 200 and ci["degenerate_resamples"]["auroc_macro14"] == hernia
    assert ci["degenerate_resamples"]["Atelectasis"] == 0
    json.dumps(ci, allow_nan=False)
    assert ci == confidence_intervals(logits, labels, patient, resamples=200, seed=1)  # seeded
    bca = confidence_intervals(logits, labels, patient, resamples=200, seed=1, method="bca")
    assert (
        bca["method"] == "bca" and bca["auroc_macro14"][0] < point["auroc_macro14"] < bca["auroc_macro14"][1]
    )
    with pytest.raises(ValueError, match="interval method"):
        confidence_intervals(logits, labels, patient, resamples=10, method="normal")


def _clustered_set(
    rng: np.random.Generator, patients: int, sizes: tuple[int, int], spread: float, noise: float
):
    """One label per patient (all its images share it, prevalence 0.3); score = 1.0 * label + patient effect
    N(0, spread^2) + image noise N(0, noise^2). Positive and negative images are then normal with the same
    variance, so the true AUROC is Phi(1 / sqrt(2 (spread^2 + noise^2)))."""
    size = rng.integers(sizes[0], sizes[1] + 1, patients)
    patient = np.repeat(np.arange(patients), size)
    label = (rng.random(patients) < 0.3).astype(np.float32)
    label[:2] = (0, 1)  # both classes present
    scores = label + spread * rng.normal(size=patients)
    logits = (scores[patient] + noise * rng.normal(size=patient.size))[:, None]
    truth = norm.cdf(1.0 / np.sqrt(2 * (spread**2 + noise**2)))
    return logits.astype(np.float32), label[patient][:, None], patient, truth


def test_patient_interval_coverage_on_simulated_sets() -> None:
    """200 simulated test sets of 60 patients (1-4 images each, correlated as in `_clustered_set`); the 95%
    percentile interval from 300 patient resamples must cover the true AUROC in 90-99% of them."""
    rng = np.random.default_rng(2024)
    covered = 0
    for k in range(200):
        logits, labels, patient, truth = _clustered_set(rng, 60, (1, 4), spread=0.6, noise=0.6)
        ci = confidence_intervals(
            logits, labels, patient, resamples=300, seed=k, label_names=("Atelectasis",)
        )
        lo, hi = ci["auroc_per_finding"]["Atelectasis"]
        covered += lo <= truth <= hi
    assert 180 <= covered <= 198, f"covered {covered}/200"


def test_patient_intervals_wider_than_image_intervals_when_images_correlate() -> None:
    rng = np.random.default_rng(7)
    logits, labels, patient, _ = _clustered_set(rng, 80, (4, 10), spread=1.0, noise=0.1)
    names = ("Atelectasis",)
    by_patient = confidence_intervals(logits, labels, patient, resamples=400, seed=0, label_names=names)
    by_image = confidence_intervals(logits, labels, None, resamples=400, seed=0, label_names=names)
    assert by_image["unit"] == "image"
    width_patient = np.diff(by_patient["auroc_per_finding"]["Atelectasis"])[0]
    width_image = np.diff(by_image["auroc_per_finding"]["Atelectasis"])[0]
    assert width_patient > 1.5 * width_image


def test_evaluation_imports_no_lightning_hydra_or_torchmetrics() -> None:
    """Evaluation runs on torch + timm alone: it may use inference, data and model.backbone (DESIGN.md's
    direction), never training, sweeps, reports or Lightning."""
    code = (
        "import sys, xraycls.evaluation.bootstrap, xraycls.evaluation.paired\n"
        "import xraycls.evaluation.calibration\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'lightning', 'pytorch_lightning', "
        "'hydra', 'omegaconf', 'torchmetrics'} or (m.startswith('xraycls.') and m.split('.')[1] in "
        "{'training', 'experiment', 'report', 'cli', 'hardware'}))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_shapes_are_refused() -> None:
    logits, labels, patient = _fixed_set()
    with pytest.raises(ValueError, match="must both be"):
        point_metrics(logits[:, :14], labels)
    with pytest.raises(ValueError, match="one id per image"):
        confidence_intervals(logits, labels, patient[:-1], resamples=5)
    assert len(FINDINGS) == 14


def test_bca_interval_matches_scipy_given_the_same_replicates() -> None:
    from scipy.stats import bootstrap

    from xraycls.evaluation.bootstrap import interval

    x = np.random.default_rng(0).exponential(size=40)
    res = bootstrap((x,), np.mean, method="BCa", n_resamples=999, random_state=0)
    jack = np.array([np.delete(x, i).mean() for i in range(x.size)])
    lo, hi = interval(res.bootstrap_distribution, 0.95, "bca", x.mean(), jack)
    assert (lo, hi) == pytest.approx(tuple(res.confidence_interval), abs=1e-12)
    assert interval(res.bootstrap_distribution, 0.95) != (lo, hi)
