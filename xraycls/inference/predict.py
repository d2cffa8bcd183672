"""Files -> probabilities: read each image as training did, run the exported model in batches, flag findings.

The model is the ``model/`` bundle (`xraycls.inference.bundle`); images are read by
`xraycls.inference.readers.read_image` at the bundle's ``preprocessing.image_size`` and go through
`ModelBundle.predict_proba`, so the preprocessing is the training pipeline's own code. A finding is flagged
when its probability is >= its operating threshold (`xraycls.inference.thresholds.flag_findings`), stored
by the training run in ``config.json`` under ``extra.thresholds`` = {"method": ..., "per_finding": {name:
{"threshold", "sensitivity", "specificity"}}}; a finding the model stores no entry for uses 0.5, one
stored as None (no ROC curve on validation) is never flagged, and every output says which. Only the 14
findings are flagged; "No Finding" keeps its probability column. A file that cannot be read is recorded as a
`Failure` (path and problem) and the others are still predicted. The result types live in
`xraycls.inference.results`; every output carries `xraycls.disclaimer.DISCLAIMER`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from xraycls.data.images import ImageDecodeError
from xraycls.findings import FINDINGS, LABELS
from xraycls.inference.bundle import ModelBundle
from xraycls.inference.readers import read_image
from xraycls.inference.results import DEFAULT_THRESHOLD, Failure, Predictions, Thresholds

__all__ = [
    "BatchCallback",
    "load_thresholds",
    "resolve_device",
    "predict_files",
]

log = logging.getLogger(__name__)

# Called after each batch with the batch's paths, its uint8 [image_size, image_size] images and its
# float32 [B, 15] probabilities (e.g. to write heatmaps while the images are in memory).
BatchCallback = Callable[[list[Path], list[np.ndarray], np.ndarray], None]


def _threshold_value(value: Any, where: str) -> float | None:
    if isinstance(value, dict):
        value = value.get("threshold")
    if value is None:  # stored as None where validation had no positives or no negatives
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: threshold must be a number in [0, 1] or null, got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{where}: threshold must be in [0, 1], got {value!r}")
    return float(value)


def load_thresholds(bundle: ModelBundle) -> Thresholds:
    """The operating thresholds stored in the bundle's config (``extra.thresholds``), 0.5 where none is.

    Raises ValueError, naming the entry, for a malformed entry or an unknown label name.
    """
    where = "model config.json extra.thresholds"
    stored = (bundle.config.get("extra") or {}).get("thresholds")
    if stored is None:
        return Thresholds({name: DEFAULT_THRESHOLD for name in FINDINGS}, "none saved", tuple(FINDINGS))
    per_finding = stored.get("per_finding") if isinstance(stored, dict) else None
    if not isinstance(per_finding, dict):
        raise ValueError(f"{where} must be a mapping with a 'per_finding' mapping, got {stored!r}")
    unknown = sorted(set(per_finding) - set(LABELS))
    if unknown:
        raise ValueError(f"{where}: unknown label name(s) {unknown}; known: {list(LABELS)}")
    values = {
        name: _threshold_value(per_finding[name], f"{where}.per_finding.{name}")
        if name in per_finding
        else DEFAULT_THRESHOLD
        for name in FINDINGS
    }
    defaulted = tuple(name for name in FINDINGS if name not in per_finding)
    return Thresholds(values, str(stored.get("method", "unspecified method")), defaulted)


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a CUDA GPU is usable, else 'cpu'; 'cpu', 'cuda' and 'cuda:N' are checked.

    Raises ValueError for an unknown name, or for CUDA asked for where none is available.
    """
    name = device.strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r}: CUDA is not available here (torch {torch.__version__}, "
                f"torch.cuda.is_available() is False); use --device cpu or --device auto"
            )
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ValueError(f"device {device!r}: {torch.cuda.device_count()} CUDA device(s) visible")
        return name
    raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")


def _read_one(path: Path, size: int) -> tuple[np.ndarray | None, str | None]:
    """(image, None) or (None, problem): bad files become one line each instead of stopping the run."""
    try:
        return read_image(path, size), None
    except ImageDecodeError as err:
        return None, err.problem
    except FileNotFoundError:
        return None, "no such file or folder"
    except IsADirectoryError:
        return None, "is a folder with no images"
    except OSError as err:
        return None, f"cannot read the file ({err.strerror or err})"


def predict_files(
    bundle: ModelBundle,
    files: Sequence[Path],
    *,
    thresholds: Thresholds | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    workers: int = 1,
    progress: bool = True,
    on_batch: BatchCallback | None = None,
) -> Predictions:
    """Predict every file in `files`, `batch_size` at a time on `device` (resolved, e.g. by `resolve_device`).

    `workers` threads read each batch's files (OpenCV decodes without holding the GIL). Files that cannot
    be read are listed in `failures` and have no row. A progress bar (stderr) counts files unless
    `progress` is False. `thresholds` default to `load_thresholds(bundle)`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    thresholds = thresholds or load_thresholds(bundle)
    size = int(bundle.preprocessing["image_size"])
    paths: list[Path] = []
    chunks: list[np.ndarray] = []
    failures: list[Failure] = []
    files = [Path(path) for path in files]
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        with tqdm(total=len(files), unit="image", desc="predict", disable=not progress) as bar:
            for start in range(0, len(files), batch_size):
                batch = files[start : start + batch_size]
                sizes = [size] * len(batch)
                reads = list((pool.map if pool else map)(_read_one, batch, sizes))
                good_paths, images = [], []
                for path, (image, problem) in zip(batch, reads, strict=True):
                    if image is None:
                        failures.append(Failure(path, str(problem)))
                    else:
                        good_paths.append(path)
                        images.append(image)
                if images:
                    probs = bundle.predict_proba(images, device=device, batch_size=batch_size)
                    paths += good_paths
                    chunks.append(probs)
                    if on_batch is not None:
                        on_batch(good_paths, images, probs)
                bar.update(len(batch))
    finally:
        if pool is not None:
            pool.shutdown()
    for failure in failures:
        log.debug("not predicted: %s", failure)
    probabilities = np.concatenate(chunks) if chunks else np.zeros((0, len(LABELS)), dtype=np.float32)
    return Predictions(
        paths=paths,
        probabilities=probabilities,
        flagged=thresholds.flag(probabilities),
        thresholds=thresholds,
        device=device,
        failures=failures,
    )
