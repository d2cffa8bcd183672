"""What a finished run leaves besides summary.json: the model bundle (model/), the plots (plots/) and the test
predictions (predictions_test.csv, `xraycls.evaluation.predictions`: what `xraycls compare` reads)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from xraycls.evaluation.predictions import ScoredImages, write_scored_images
from xraycls.findings import NUM_LABELS
from xraycls.inference.bundle import export_bundle
from xraycls.inference.calibration import CALIBRATION_KEY
from xraycls.model.module import XrayClassifier
from xraycls.report.plots import plot_roc_curves, plot_sample_grid, plot_training_curves
from xraycls.training.summary import headline_metrics

__all__ = [
    "PREDICTIONS_TEST_NAME",
    "export_model",
    "write_plots",
    "gathered_test_ids",
    "write_test_predictions",
]

PREDICTIONS_TEST_NAME = "predictions_test.csv"


log = logging.getLogger(__name__)


def gathered_test_ids(
    datamodule: Any, world_size: int = 1, scored: int | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """(image names, patient ids) of the test part in the order of the gathered test outputs, or None when
    they cannot be matched to the `scored` outputs.

    One process sees the part in order, so a pass cut short (`trainer.limit_test_batches`) scored its first
    `scored` images; under DDP each rank r took images r, r + W, ... (the DataModule's unpadded eval
    sampler) and the gathered outputs are the ranks' shares one after another, matched only when whole.
    """
    table, assignment = datamodule.table, datamodule.assignment
    rows = np.asarray(assignment.indices("test"), dtype=np.int64)
    order = np.concatenate([np.arange(len(rows))[r::world_size] for r in range(world_size)])
    rows = rows[order]
    if scored is not None and scored != len(rows):
        if world_size != 1 or scored > len(rows):
            log.warning(
                "%d test outputs for %d test images: no per-image ids, no intervals", scored, len(rows)
            )
            return None
        log.warning(
            "the test pass scored %d of %d images (limit_test_batches): intervals cover those",
            scored,
            len(rows),
        )
        rows = rows[:scored]
    return table["image"].to_numpy(dtype=str)[rows], table["patient_id"].to_numpy()[rows]


def write_test_predictions(
    run_dir: Path, test_outputs: tuple[np.ndarray, np.ndarray], ids: tuple[np.ndarray, np.ndarray], split: str
) -> Path:
    """predictions_test.csv: image, patient, the 15 test probabilities and the 15 labels."""
    probs, labels = test_outputs
    images, patients = ids
    if len(images) != len(probs):
        raise RuntimeError(f"{len(probs)} test outputs for the {len(images)} images of the test part")
    note = f"Run {run_dir}; {split} test; probabilities of the best checkpoint."
    return write_scored_images(
        run_dir / PREDICTIONS_TEST_NAME, ScoredImages(images, patients, probs, labels), note
    )


def write_plots(
    run_dir: Path, test_outputs: tuple[np.ndarray, np.ndarray] | None, datamodule: Any
) -> list[str]:
    """plots/: training curves (metrics.csv), the test ROC curves (given test outputs), 9 training images."""
    plots_dir = run_dir / "plots"
    written = [str(path) for path in plot_training_curves(run_dir / "metrics.csv", plots_dir)]
    if test_outputs is not None:
        probs, labels = test_outputs
        written.append(
            str(plot_roc_curves(probs, labels, plots_dir / "roc_test.png", title="ROC, test split"))
        )
    train = datamodule.datasets["train"]
    count = min(9, len(train))
    images = np.stack([train[i][0].numpy() for i in range(count)])
    labels = np.stack([train[i][1].numpy() for i in range(count)])
    written.append(
        str(plot_sample_grid(images, labels, plots_dir / "train_samples.png", title="training images"))
    )
    return written


# The DataModule settings that rebuild its split (`xraycls evaluate` reads them from model/config.json).
_SPLIT_KEYS = ("split", "split_seed", "split_row_order", "val_fraction", "test_fraction")


def export_model(run_dir: Path, model: XrayClassifier, datamodule: Any, summary: dict) -> Path:
    """model/: the backbone's weights with its build arguments, the preprocessing, the headline metrics,
    the operating thresholds (xraycls.inference.bundle), the split and loss weights it was trained and
    scored with and its temperatures if fitted: enough for `xraycls predict` and `xraycls evaluate` alone."""
    hp, dhp = model.hparams, datamodule.hparams
    kwargs = {
        "num_classes": NUM_LABELS,
        "img_size": hp.img_size,
        "patch_size": hp.patch_size,
        "global_pool": hp.get("global_pool"),
    }
    preprocessing = {
        "image_size": dhp.image_size,
        "input_size": dhp.input_size,
        "mean": dhp.mean,
        "std": dhp.std,
        "channels": 3,
    }
    return export_bundle(
        model.backbone,
        run_dir / "model",
        backbone_name=hp.backbone,
        backbone_kwargs={k: v for k, v in kwargs.items() if v is not None},
        preprocessing=preprocessing,
        metrics=headline_metrics(summary["metrics"]),
        extra=_extra(model, dhp, summary),
    )


def _extra(model: XrayClassifier, dhp: Any, summary: dict) -> dict[str, Any]:
    pos_weight = getattr(model, "pos_weight", None)
    extra: dict[str, Any] = {
        "thresholds": summary.get("thresholds"),
        # `xraycls evaluate` rebuilds this split by default and scores the loss with these weights.
        "data": {key: dhp.get(key) for key in _SPLIT_KEYS},
        "loss": {"pos_weight": None if pos_weight is None else [float(w) for w in pos_weight.tolist()]},
    }
    calibration = summary.get("calibration")
    if calibration is not None:
        extra[CALIBRATION_KEY] = {k: calibration[k] for k in ("method", "temperatures", "fitted_on")}
    return extra
