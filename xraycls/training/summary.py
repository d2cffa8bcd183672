"""Pieces of a run's summary.json (DESIGN.md's contract): software versions, metric blocks, the operating
thresholds chosen on validation, the headline metrics a model bundle carries. Written by
`xraycls.files.write_json`.
"""

from __future__ import annotations

import logging
import platform
from importlib import metadata
from typing import Any

import numpy as np
import torch

from xraycls.inference.thresholds import choose_thresholds

__all__ = ["SUMMARY_NAME", "collect_versions", "metrics_block", "run_thresholds", "headline_metrics"]

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
