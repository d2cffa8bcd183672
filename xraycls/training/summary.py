"""Pieces of a run's summary.json (DESIGN.md's contract): software versions, metric blocks, the operating
thresholds chosen on validation, the test intervals and calibration (`eval` settings), the headline metrics
a model bundle carries. Written by `xraycls.files.write_json`.
"""

from __future__ import annotations

import logging
import platform
from importlib import metadata
from typing import Any

import numpy as np
import torch

from xraycls.evaluation.bootstrap import confidence_intervals
from xraycls.evaluation.calibration import calibration_summary, fit_temperatures
from xraycls.inference.calibration import logits_from_probabilities
from xraycls.inference.thresholds import choose_thresholds

__all__ = [
    "SUMMARY_NAME",
    "collect_versions",
    "metrics_block",
    "run_thresholds",
    "headline_metrics",
    "eval_settings",
    "ci_block",
    "calibration_block",
]

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"
# What a model bundle's config keeps of each metrics block.
_HEADLINE_KEYS = ("split", "loss", "auroc_macro14", "auroc_seed_compat")

# Distribution name -> key in the versions dict; every one of these is a dependency of xraycls.
_PACKAGES: dict[str, str] = {
    "torch": "torch",
    "lightning": "lightning",
    "timm": "timm",
    "torchmetrics": "torchmetrics",
    "albumentations": "albumentations",
    "numpy": "numpy",
    "xraycls": "xraycls",
}
# Reported only where installed (the IPU stack exists on Graphcore hosts alone).
_OPTIONAL_PACKAGES: dict[str, str] = {"poptorch": "poptorch", "lightning-graphcore": "lightning_graphcore"}


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def collect_versions() -> dict[str, Any]:
    """{"python", "platform", <package>: version or None, "cuda": runtime version or None, "devices": [...]}.

    ``devices`` lists the CUDA device names this process sees (empty without CUDA); ``cuda`` is the CUDA
    version torch was built with, None where no GPU is usable.
    """
    versions: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for distribution, key in _PACKAGES.items():
        versions[key] = _version(distribution)
    versions["torch"] = torch.__version__  # with its build tag (e.g. +cu130), which metadata leaves out
    if versions["xraycls"] is None:  # running from a source tree that was never pip-installed
        import xraycls

        versions["xraycls"] = xraycls.__version__
    for distribution, key in _OPTIONAL_PACKAGES.items():
        found = _version(distribution)
        if found is not None:
            versions[key] = found
    cuda = torch.cuda.is_available()
    versions["cuda"] = torch.version.cuda if cuda else None
    versions["devices"] = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    )
    return versions


def metrics_block(values: dict | None, split: str) -> dict | None:
    """summary.json's `metrics.val` / `metrics.test`: the split's name, then the stage's metrics."""
    if values is None:
        return None
    return {"split": split, **values}


def run_thresholds(outputs: tuple[np.ndarray, np.ndarray] | None, settings: dict, split: str) -> dict | None:
    """Operating thresholds from the best checkpoint's validation pass (never the test set)."""
    if outputs is None:
        log.warning("no validation outputs: no operating thresholds are stored with the model")
        return None
    probs, labels = outputs
    return {**choose_thresholds(probs, labels, **settings), "chosen_on": {"stage": "val", "split": split}}


def headline_metrics(metrics: dict[str, dict | None]) -> dict[str, dict]:
    """Per stage with metrics, its split, loss, macro AUROC (14) and seed-compatible AUROC."""
    return {
        part: {key: block[key] for key in _HEADLINE_KEYS if key in block}
        for part, block in metrics.items()
        if block
    }


def eval_settings(cfg: Any) -> dict[str, Any]:
    """The ``eval`` node checked: {"bootstrap": int >= 0, "seed": int, "temperature_scaling": bool}."""
    node = cfg.get("eval") or {}
    settings = {
        "bootstrap": node.get("bootstrap", 2000),
        "seed": node.get("seed", 0),
        "temperature_scaling": node.get("temperature_scaling", False),
    }
    for key in ("bootstrap", "seed"):
        if isinstance(settings[key], bool) or not isinstance(settings[key], int):
            raise ValueError(f"eval.{key} must be an integer, got {settings[key]!r}")
    if settings["bootstrap"] < 0:
        raise ValueError(f"eval.bootstrap must be >= 0 (0 skips the intervals), got {settings['bootstrap']}")
    if not isinstance(settings["temperature_scaling"], bool):
        raise ValueError(
            f"eval.temperature_scaling must be true or false, got {settings['temperature_scaling']!r}"
        )
    return settings


def ci_block(
    outputs: tuple[np.ndarray, np.ndarray] | None, patients: np.ndarray | None, settings: dict[str, Any]
) -> dict | None:
    """The ``ci`` block of ``metrics.test`` (patient bootstrap) from the test probabilities; None if skipped.

    The probabilities (float32 sigmoid) are turned back into logits: ranks are those of the logits, except
    where float32 saturates to 0 or 1.
    """
    if outputs is None or settings["bootstrap"] == 0:
        return None
    probs, labels = outputs
    return confidence_intervals(
        logits_from_probabilities(probs),
        labels,
        patients,
        resamples=settings["bootstrap"],
        seed=settings["seed"],
    )


def calibration_block(
    val_outputs: tuple[np.ndarray, np.ndarray] | None,
    test_outputs: tuple[np.ndarray, np.ndarray] | None,
    settings: dict[str, Any],
    split: str,
) -> dict | None:
    """With ``eval.temperature_scaling``: temperatures fitted on validation, test ECE before and after."""
    if not settings["temperature_scaling"]:
        return None
    if val_outputs is None:
        log.warning("eval.temperature_scaling: no validation outputs, no temperatures are fitted")
        return None
    val_probs, val_labels = val_outputs
    temperatures = fit_temperatures(logits_from_probabilities(val_probs), val_labels)
    block: dict[str, Any] = {
        "method": "temperature",
        "temperatures": temperatures,
        "fitted_on": {"stage": "val", "split": split},
    }
    if test_outputs is not None:
        test = calibration_summary(test_outputs[0], test_outputs[1], temperatures)
        block.update(bins=test["bins"], rule=test["rule"], ece_test=test["ece"],
                     ece_test_calibrated=test["ece_calibrated"])  # fmt: skip
    return block
