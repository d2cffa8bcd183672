"""The whole `xraycls evaluate` job: a model bundle on one part of one split, numbers you can publish.

Every check (bundle, thresholds, temperatures, data, image size, labels, split, part, output folder) runs
before the first prediction. Outputs in `out`:

- ``metrics.json``: summary.json's ``metrics.test`` layout (``loss``, ``auroc_macro14``, ``auroc_macro15``,
  ``auroc_seed_compat``, ``auroc_per_finding``) plus ``split``, ``part``, ``images``, ``patients``, ``ci``
  (patient bootstrap, `xraycls.evaluation.bootstrap`), ``average_precision_per_finding``,
  ``operating_points`` (sensitivity / specificity at the bundle's thresholds), ``calibration`` (ECE per
  label, before and after the bundle's temperatures if it stores any), and where the numbers came from;
- ``predictions.csv`` (`xraycls.evaluation.predictions`): calibrated probabilities when `calibrated`;
- ``roc.png``, ``pr.png``, ``reliability.png`` (and ``reliability_calibrated.png`` with temperatures).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

import xraycls
from xraycls.disclaimer import DISCLAIMER
from xraycls.evaluation.calibration import calibration_report, calibration_summary, plot_reliability
from xraycls.evaluation.data import load_eval_set, split_settings
from xraycls.evaluation.plots import plot_pr_curves
from xraycls.evaluation.predictions import ScoredImages, write_scored_images
from xraycls.evaluation.scoring import metrics_block, operating_points, predict_logits, stored_pos_weight
from xraycls.files import write_json
from xraycls.inference.bundle import load_bundle
from xraycls.inference.calibration import calibrate_probabilities, calibrate_thresholds, load_temperatures
from xraycls.inference.predict import load_thresholds, resolve_device
from xraycls.report.plots import plot_roc_curves

__all__ = ["METRICS_NAME", "PREDICTIONS_NAME", "run_evaluate"]

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.json"
PREDICTIONS_NAME = "predictions.csv"


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")


def run_evaluate(
    model_dir: Path,
    out: Path,
    *,
    cache_dir: Path | None = None,
    root: Path | None = None,
    split: str | None = None,
    split_seed: int | None = None,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    part: str = "test",
    bootstrap: int = 2000,
    seed: int = 0,
    device: str = "auto",
    calibrated: bool = False,
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Score the bundle in `model_dir` on `part` of the split and write the module doc's files into `out`.

    `split` None takes the bundle's own training split (``extra.data``), else "official". `bootstrap` is
    the number of patient resamples (0: no ``ci``). Returns the metrics written to metrics.json.
    """
    out = Path(out)
    _check_out(out)
    if bootstrap < 0:
        raise ValueError(f"--bootstrap must be >= 0 (0 skips the intervals), got {bootstrap}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    device = resolve_device(device)
    bundle = load_bundle(Path(model_dir), device="cpu")
    thresholds = load_thresholds(bundle)
    temperatures = load_temperatures(bundle.config, f"model bundle {model_dir}: config.json")
    if calibrated and temperatures is None:
        raise ValueError(
            f"--calibrated: model bundle {model_dir} stores no temperatures "
            "(train with eval.temperature_scaling=true to fit them on validation)"
        )
    pos_weight = stored_pos_weight(bundle.config)
    settings = split_settings(bundle.config, split, split_seed, val_fraction, test_fraction)
    data = load_eval_set(
        bundle.preprocessing, bundle.labels, cache_dir=cache_dir, root=root, split=settings, part=part
    )
    trained_on = (bundle.config.get("extra") or {}).get("data")
    if part == "train" or (trained_on and trained_on.get("split") != settings.name):
        data.notes.append(
            f"the model trained on split {trained_on.get('split') if trained_on else 'unknown'!r}: "
            f"its training images may be among these ({settings.name!r} {part})"
        )
    for note in data.notes:
        log.warning("%s", note)
    log.info("evaluating %s on %d %s images of %s (%s) on %s", model_dir, len(data.images), part,
             settings.name, data.source, device)  # fmt: skip

    logits = predict_logits(bundle, data.dataset, device=device, batch_size=batch_size, workers=workers,
                            progress=progress)  # fmt: skip
    metrics = metrics_block(
        logits, data.labels, data.patients, thresholds=thresholds, pos_weight=pos_weight,
        resamples=bootstrap, seed=seed,
    )  # fmt: skip
    probs = torch.sigmoid(torch.from_numpy(logits)).numpy()
    calibration = calibration_summary(probs, data.labels, temperatures)
    shown = probs
    if calibrated:
        shown = calibrate_probabilities(probs, temperatures).astype(np.float32)
        metrics["operating_points"] = operating_points(
            calibrate_probabilities(probs, temperatures),
            data.labels,
            calibrate_thresholds(thresholds, temperatures),
        )
    result: dict[str, Any] = {
        "split": settings.name,
        "part": part,
        "images": int(len(data.images)),
        "patients": int(len(np.unique(data.patients))),
        **metrics,
        "calibration": calibration,
        "calibrated_probabilities": bool(calibrated),
        "split_settings": asdict(settings),
        "trained_on": trained_on,
        "notes": data.notes,
        "model": str(model_dir),
        "data": data.source,
        "device": device,
        "loss_pos_weight": pos_weight,
        "xraycls_version": xraycls.__version__,
        "disclaimer": DISCLAIMER,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / METRICS_NAME, result)
    note = f"Model {model_dir}; {settings.name} {part}; " + (
        "calibrated probabilities (temperatures from validation)." if calibrated else "probabilities."
    )
    write_scored_images(
        out / PREDICTIONS_NAME, ScoredImages(data.images, data.patients, shown, data.labels), note
    )
    _plots(out, shown, data.labels, temperatures, probs, f"{settings.name} {part}")
    return result


def _plots(
    out: Path, shown: np.ndarray, labels: np.ndarray, temperatures: Any, probs: np.ndarray, where: str
) -> None:
    plot_roc_curves(shown, labels, out / "roc.png", title=f"ROC, {where} ({len(labels)} images)")
    plot_pr_curves(shown, labels, out / "pr.png", title=f"precision-recall, {where}")
    diagrams = calibration_report(probs, labels)["reliability"]
    plot_reliability(diagrams, out / "reliability.png", title=f"reliability, {where} (uncalibrated)")
    if temperatures is not None:
        calibrated = calibration_report(calibrate_probabilities(probs, temperatures), labels)["reliability"]
        plot_reliability(
            calibrated, out / "reliability_calibrated.png", title=f"reliability, {where} (calibrated)"
        )
