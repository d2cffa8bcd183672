"""The whole `xraycls predict` job: check the settings, load the bundle, predict, write every output.

Outputs: the predictions file (`xraycls.inference.outputs`), the grid figure, and heatmaps
(`xraycls.inference.heatmaps.save_heatmaps`: one overlay PNG per image and flagged finding, or per image for
one chosen finding). Every setting, output locations included, is checked before the model is loaded or any
image is read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from xraycls.disclaimer import DISCLAIMER
from xraycls.files import check_output_dir, check_output_file
from xraycls.findings import FINDINGS
from xraycls.inference.bundle import ModelBundle, load_bundle
from xraycls.inference.calibration import calibrate_probabilities, calibrate_thresholds, load_temperatures
from xraycls.inference.outputs import output_format, plot_prediction_grid, write_predictions
from xraycls.inference.predict import BatchCallback, load_thresholds, predict_files, resolve_device
from xraycls.inference.readers import collect_inputs
from xraycls.inference.results import Predictions, Thresholds

__all__ = ["run_predict"]

log = logging.getLogger(__name__)


def _check_job(
    out: Path | None,
    grid: Path | None,
    grid_size: int,
    labels_file: Path | None,
    heatmaps_dir: Path | None,
    finding: str | None,
) -> None:
    """Settings checked before any work, each error naming the option and its value; every output location
    must be writable (and a file name where a file is written), so a job never fails after predicting."""
    if out is not None:
        output_format(out)
        check_output_file(out, "--out")
    if grid is not None:
        if Path(grid).suffix.lower() != ".png":
            raise ValueError(f"--grid {grid}: the figure is a PNG; the name must end in .png")
        check_output_file(grid, "--grid")
    if grid_size < 1:
        raise ValueError(f"--grid-size must be >= 1, got {grid_size}")
    if labels_file is not None:
        if grid is None:
            raise ValueError(f"--labels {labels_file}: the real labels are shown in the --grid figure only")
        if not Path(labels_file).is_file():
            raise FileNotFoundError(f"--labels {labels_file}: no such file")
    if finding is not None:
        if heatmaps_dir is None:
            raise ValueError(f"--finding {finding}: it chooses the heatmap to draw; give --heatmaps DIR too")
        if finding not in FINDINGS:
            raise ValueError(f"--finding {finding!r} is not one of the findings {list(FINDINGS)}")
    if heatmaps_dir is not None:
        check_output_dir(heatmaps_dir, "--heatmaps")


def _heatmap_writer(
    bundle: ModelBundle, thresholds: Thresholds, out_dir: Path, finding: str | None, written: list[Path]
) -> BatchCallback:
    """A `predict_files` callback writing overlays of each image's flagged findings (or `finding`)."""
    from xraycls.inference.heatmaps import save_heatmaps

    used: dict[str, int] = {}

    def write(paths: list[Path], images: list[np.ndarray], probs: np.ndarray) -> None:
        flagged = thresholds.flag(probs)
        for path, image, row, found in zip(paths, images, probs, flagged, strict=True):
            # Two inputs with one file name (from two folders) must not overwrite each other's overlays.
            used[path.name] = used.get(path.name, 0) + 1
            name = path.name if used[path.name] == 1 else f"{path.stem}_{used[path.name]}{path.suffix}"
            findings = [finding] if finding is not None else found
            written.extend(save_heatmaps(bundle, image, row, out_dir, name, findings))

    return write


def run_predict(
    model_dir: Path,
    inputs: Sequence[Path],
    *,
    out: Path | None = None,
    grid: Path | None = None,
    grid_size: int = 3,
    labels_file: Path | None = None,
    heatmaps_dir: Path | None = None,
    finding: str | None = None,
    device: str = "auto",
    batch_size: int = 32,
    workers: int = 1,
    progress: bool = True,
    calibrated: bool = False,
) -> Predictions:
    """Predict every image in `inputs` (files or folders) with the bundle in `model_dir`, and write:

    `out` (CSV or JSON by extension); the `grid` PNG (`grid_size` squared images, titled with the real
    labels from `labels_file` when given); into `heatmaps_dir`, one overlay per image and flagged finding
    (only `finding` when given). Returns the predictions: failed files in ``failures``, overlays written in
    ``heatmaps``. `calibrated` reports the probabilities through the bundle's temperatures
    (`xraycls.inference.calibration`) with the thresholds mapped alike, so the same findings are flagged.
    Raises ValueError / FileNotFoundError naming the setting before any image is read (an output location
    that cannot be written included), and ValueError when no image file is found at all.
    """
    _check_job(out, grid, grid_size, labels_file, heatmaps_dir, finding)
    device = resolve_device(device)
    bundle = load_bundle(Path(model_dir), device="cpu")  # predict_proba moves it to `device`
    thresholds = load_thresholds(bundle)
    temperatures = load_temperatures(bundle.config, f"model bundle {model_dir}: config.json")
    if calibrated and temperatures is None:
        raise ValueError(
            f"--calibrated: model bundle {model_dir} stores no temperatures "
            "(train with eval.temperature_scaling=true to fit them on validation)"
        )
    label_table = None
    if labels_file is not None:
        from xraycls.data.labels import read_label_file

        label_table = read_label_file(Path(labels_file))
    files = collect_inputs(inputs)
    if not files:
        raise ValueError(f"no image files found in {[str(p) for p in inputs]}")
    heatmap_files: list[Path] = []
    on_batch = None
    if heatmaps_dir is not None:
        on_batch = _heatmap_writer(bundle, thresholds, Path(heatmaps_dir), finding, heatmap_files)
    log.info("predicting %d file(s) on %s with %s; %s", len(files), device, model_dir, DISCLAIMER)
    predictions = predict_files(
        bundle,
        files,
        thresholds=thresholds,
        device=device,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
        on_batch=on_batch,
    )
    predictions.model_dir = Path(model_dir)
    predictions.heatmaps = heatmap_files
    if calibrated:
        probs = calibrate_probabilities(predictions.probabilities, temperatures)
        predictions.thresholds = calibrate_thresholds(thresholds, temperatures)
        predictions.flagged = predictions.thresholds.flag(probs)  # in float64, before rounding for output
        predictions.probabilities = probs.astype(np.float32)
    if out is not None:
        write_predictions(predictions, Path(out))
    if grid is not None:
        if predictions.paths:
            plot_prediction_grid(predictions, Path(grid), n=grid_size, label_table=label_table)
        else:
            log.warning("grid %s not written: no image was predicted", grid)
    return predictions
