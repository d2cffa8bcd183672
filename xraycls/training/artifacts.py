"""What a finished run leaves besides summary.json: the model bundle (model/) and the plots (plots/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from xraycls.findings import NUM_LABELS
from xraycls.inference.bundle import export_bundle
from xraycls.model.module import XrayClassifier
from xraycls.report.plots import plot_roc_curves, plot_sample_grid, plot_training_curves
from xraycls.training.summary import headline_metrics

__all__ = ["export_model", "write_plots"]


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


def export_model(run_dir: Path, model: XrayClassifier, datamodule: Any, summary: dict) -> Path:
    """model/: the backbone's weights with its build arguments, the preprocessing, the headline metrics and
    the operating thresholds (xraycls.inference.bundle), enough for `xraycls predict` alone."""
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
        extra={"thresholds": summary.get("thresholds")},
    )
