"""XrayMetrics against sklearn's roc_auc_score, computed the way the literature and the guide did."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from sklearn.metrics import roc_auc_score

from xraycls.findings import FINDINGS, LABELS, NUM_LABELS
from xraycls.model.metrics import XrayMetrics


def _random_set(n: int = 400, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Logits with some signal per label, and 0/1 labels with every label present and absent."""
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, NUM_LABELS)) < rng.uniform(0.05, 0.5, NUM_LABELS)).astype(np.float32)
    logits = (rng.normal(size=(n, NUM_LABELS)) + 1.5 * labels * rng.uniform(0, 1, NUM_LABELS)).astype(
        np.float32
    )
    return logits, labels


def _fed(logits: np.ndarray, labels: np.ndarray, batch: int = 64) -> XrayMetrics:
    metrics = XrayMetrics(stage="val")
    for start in range(0, len(logits), batch):
        chunk = slice(start, start + batch)
        metrics.update(torch.from_numpy(logits[chunk]), torch.from_numpy(labels[chunk]))
    return metrics


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def test_matches_sklearn_per_label_and_macros() -> None:
    logits, labels = _random_set()
    result = _fed(logits, labels).compute()

    per_label = roc_auc_score(labels, logits, average=None)
    assert list(result["auroc_per_finding"]) == list(LABELS)
    assert np.allclose(list(result["auroc_per_finding"].values()), per_label, atol=1e-6)
    assert result["auroc_macro15"] == pytest.approx(per_label.mean(), abs=1e-6)
    assert result["auroc_macro14"] == pytest.approx(per_label[: len(FINDINGS)].mean(), abs=1e-6)
    assert result["auroc_macro14"] != pytest.approx(result["auroc_macro15"], abs=1e-6)


def test_seed_compat_is_the_guides_sklearn_call() -> None:
    logits, labels = _random_set(seed=3)
    result = _fed(logits, labels).compute()

    # The guide: softmax over the 15 logits, then roc_auc_score(multi_class="ovo") on the indicator matrix.
    guide = roc_auc_score(labels.astype(int), _softmax(logits), multi_class="ovo")
    assert result["auroc_seed_compat"] == pytest.approx(guide, abs=1e-6)
    # The softmax couples the labels, so it is a different number from the sigmoid macro.
    assert result["auroc_seed_compat"] != pytest.approx(result["auroc_macro15"], abs=1e-4)


def test_loss_is_the_batch_size_weighted_mean() -> None:
    metrics = XrayMetrics()
    logits, labels = torch.zeros(3, NUM_LABELS), torch.ones(3, NUM_LABELS)
    metrics.update(logits[:1], labels[:1], torch.tensor(1.0))
    metrics.update(logits[1:], labels[1:], torch.tensor(4.0))
    assert metrics.compute()["loss"] == pytest.approx((1.0 + 2 * 4.0) / 3)


def test_label_without_positives_is_nan_and_left_out(caplog: pytest.LogCaptureFixture) -> None:
    logits, labels = _random_set(seed=11)
    hernia = LABELS.index("Hernia")
    labels[:, hernia] = 0.0
    with caplog.at_level(logging.WARNING, logger="xraycls.model.metrics"):
        result = _fed(logits, labels).compute()

    assert math.isnan(result["auroc_per_finding"]["Hernia"])
    keep = [i for i in range(NUM_LABELS) if i != hernia]
    per_label = roc_auc_score(labels[:, keep], logits[:, keep], average=None)
    findings = [i for i, label_index in enumerate(keep) if label_index < len(FINDINGS)]
    assert result["auroc_macro14"] == pytest.approx(per_label[findings].mean(), abs=1e-6)
    assert result["auroc_macro15"] == pytest.approx(per_label.mean(), abs=1e-6)
    seed_compat = roc_auc_score(labels[:, keep].astype(int), _softmax(logits)[:, keep], average=None).mean()
    assert result["auroc_seed_compat"] == pytest.approx(seed_compat, abs=1e-6)
    assert "Hernia" in caplog.text and "NaN" in caplog.text


def test_reset_starts_a_new_stage() -> None:
    logits, labels = _random_set(seed=5)
    metrics = _fed(logits, labels)
    metrics.reset()
    half = len(logits) // 2
    metrics.update(torch.from_numpy(logits[:half]), torch.from_numpy(labels[:half]))
    expected = roc_auc_score(labels[:half], logits[:half], average=None).mean()
    assert metrics.compute()["auroc_macro15"] == pytest.approx(expected, abs=1e-6)


def test_compute_before_update_is_all_nan() -> None:
    result = XrayMetrics().compute()
    assert math.isnan(result["auroc_macro14"]) and math.isnan(result["loss"])
    assert all(math.isnan(v) for v in result["auroc_per_finding"].values())


def test_wrong_shape_names_the_stage_and_shapes() -> None:
    with pytest.raises(ValueError, match=r"test metrics: logits \(4, 14\)"):
        XrayMetrics(stage="test").update(torch.zeros(4, 14), torch.zeros(4, 14))


def _two_halves() -> tuple[np.ndarray, np.ndarray]:
    """200 images: the first 100 well separated, the last 100 pure noise, so per-half AUROCs differ."""
    logits, labels = _random_set(n=200, seed=21)
    logits[100:] = np.random.default_rng(22).normal(size=logits[100:].shape).astype(np.float32)
    return logits, labels


def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        logits, labels = _two_halves()
        mine = slice(rank * 100, (rank + 1) * 100)
        result = _fed(logits[mine], labels[mine], batch=32).compute()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_compute_auroc_over_the_whole_set(tmp_path: Path) -> None:
    # Two real gloo ranks. Spawned, not forked: a fork after torch's OpenMP pool has run can deadlock.
    args = (2, str(tmp_path / "init"), str(tmp_path))
    context = mp.start_processes(_rank_main, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "DDP ranks did not finish within 120 s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()

    logits, labels = _two_halves()
    pooled = roc_auc_score(labels, logits, average=None).mean()
    halves = (slice(0, 100), slice(100, 200))
    per_rank_mean = np.mean([roc_auc_score(labels[h], logits[h], average=None).mean() for h in halves])
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["auroc_macro15"] == pytest.approx(pooled, abs=1e-6)
        assert result["auroc_macro15"] != pytest.approx(per_rank_mean, abs=1e-3)
