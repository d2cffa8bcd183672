"""A bundle's logits on an evaluation set, and the numbers made from them.

`predict_logits` runs the set through the bundle in batches (a DataLoader over the training datasets,
uint8 to the device, `ModelBundle.normalize`, the backbone), as training's evaluation loop does.
`metrics_block` gives what summary.json's ``metrics.test`` holds (``loss``: mean BCE-with-logits over images
and labels with the run's ``pos_weight`` when the bundle stores one; the AUROC keys of
`xraycls.model.metrics.XrayMetrics`), plus ``average_precision_per_finding``, the patient bootstrap ``ci``
block and ``operating_points``: sensitivity and specificity per finding at the bundle's thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from xraycls.evaluation.bootstrap import confidence_intervals, point_metrics
from xraycls.findings import FINDINGS, LABELS
from xraycls.inference.bundle import ModelBundle
from xraycls.inference.results import Thresholds
from xraycls.inference.thresholds import THRESHOLD_RULE

__all__ = ["predict_logits", "bce_loss", "operating_points", "metrics_block", "stored_pos_weight"]


def predict_logits(
    bundle: ModelBundle,
    dataset: Dataset,
    *,
    device: str = "cpu",
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """float32 logits [N, len(labels)] of every `dataset` item ((uint8 [H, W], labels)), in order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Moved outside inference mode, as `ModelBundle.predict_proba` does (heatmaps need the same model).
    bundle.model.to(device).eval()
    bundle.normalize.to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    chunks = []
    with (
        torch.inference_mode(),
        tqdm(total=len(dataset), unit="image", desc="evaluate", disable=not progress) as bar,
    ):
        for images, _labels in loader:
            logits = bundle.model(bundle.normalize(images.to(device)))
            chunks.append(logits.float().cpu())
            bar.update(len(images))
    if not chunks:
        return np.zeros((0, len(bundle.labels)), dtype=np.float32)
    return torch.cat(chunks).numpy()


def stored_pos_weight(config: Mapping[str, Any]) -> list[float] | None:
    """The run's BCE ``pos_weight`` (``extra.loss.pos_weight``), or None (plain BCE, or not recorded)."""
    loss = (config.get("extra") or {}).get("loss") or {}
    weights = loss.get("pos_weight")
    if weights is None:
        return None
    if not isinstance(weights, list) or len(weights) != len(LABELS):
        raise ValueError(
            f"model config.json extra.loss.pos_weight must list {len(LABELS)} numbers: {weights!r}"
        )
    return [float(w) for w in weights]


def bce_loss(logits: np.ndarray, labels: np.ndarray, pos_weight: Sequence[float] | None = None) -> float:
    """Mean BCE-with-logits over images and labels in float32, as the LightningModule's loss."""
    weight = None if pos_weight is None else torch.tensor(list(pos_weight), dtype=torch.float32)
    value = F.binary_cross_entropy_with_logits(
        torch.as_tensor(np.asarray(logits), dtype=torch.float32),
        torch.as_tensor(np.asarray(labels), dtype=torch.float32),
        pos_weight=weight,
    )
    return float(value)


def _rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


def operating_points(probs: np.ndarray, labels: np.ndarray, thresholds: Thresholds) -> dict[str, Any]:
    """Per finding: its threshold, images flagged, sensitivity and specificity (None where undefined)."""
    positive = np.asarray(labels) > 0.5
    rows = [set(found) for found in thresholds.flag(np.asarray(probs))]  # the rule `predict` flags by
    per_finding = {}
    for name in FINDINGS:
        pos = positive[:, LABELS.index(name)]
        flag = np.array([name in found for found in rows], dtype=bool)
        per_finding[name] = {
            "threshold": thresholds.values.get(name),
            "flagged": int(flag.sum()),
            "sensitivity": _rate(int((flag & pos).sum()), int(pos.sum())),
            "specificity": _rate(int((~flag & ~pos).sum()), int((~pos).sum())),
        }
    return {"rule": THRESHOLD_RULE, "source": thresholds.describe(), "per_finding": per_finding}


def metrics_block(
    logits: np.ndarray,
    labels: np.ndarray,
    patients: np.ndarray | None,
    *,
    thresholds: Thresholds | None = None,
    pos_weight: Sequence[float] | None = None,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """summary.json's ``metrics.test`` keys, ``average_precision_per_finding``, ``ci`` (None when
    `resamples` is 0) and ``operating_points`` (given `thresholds`)."""
    point = point_metrics(logits, labels)
    block: dict[str, Any] = {
        "loss": bce_loss(logits, labels, pos_weight),
        **{key: point[key] for key in ("auroc_macro14", "auroc_macro15", "auroc_seed_compat")},
        "auroc_per_finding": point["auroc_per_finding"],
        "average_precision_per_finding": point["average_precision_per_finding"],
        "ci": (
            confidence_intervals(logits, labels, patients, resamples=resamples, seed=seed, level=level)
            if resamples > 0
            else None
        ),
    }
    if thresholds is not None:
        probs = torch.sigmoid(torch.as_tensor(np.asarray(logits), dtype=torch.float32)).numpy()
        block["operating_points"] = operating_points(probs, labels, thresholds)
    if not math.isfinite(block["loss"]):
        block["loss"] = None
    return block
