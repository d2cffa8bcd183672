"""Per-label temperatures stored in a model bundle, and applying them to probabilities and thresholds.

A training run with ``eval.temperature_scaling=true`` fits one temperature T > 0 per label on VALIDATION
(never test; `xraycls.evaluation.calibration.fit_temperatures`) and stores them in ``config.json`` under
``extra.calibration`` = {"method": "temperature", "temperatures": {label: T}, "fitted_on": {...}}.

Calibrated probability = sigmoid(logit / T). Dividing by T > 0 is monotone, so rankings (AUROC, AP) do
not change, and `map_thresholds` carries each operating threshold through the same map: an image flagged
before (probability >= threshold) is flagged after, and no other. `calibrate_probabilities` works from the
float32 probabilities through their logits in float64, so probability and threshold go through one
function and keep their order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from scipy.special import expit, logit

from xraycls.findings import LABELS
from xraycls.inference.results import Thresholds

__all__ = [
    "CALIBRATION_KEY",
    "load_temperatures",
    "apply_temperatures",
    "map_thresholds",
    "logits_from_probabilities",
    "calibrate_probabilities",
    "calibrate_thresholds",
]

CALIBRATION_KEY = "calibration"  # under config.json's ``extra``


def _vector(temperatures: Mapping[str, float], label_names: Sequence[str]) -> np.ndarray:
    missing = [name for name in label_names if name not in temperatures]
    if missing:
        raise ValueError(f"no temperature for {missing}")
    t = np.array([temperatures[name] for name in label_names], dtype=float)
    if not np.all(t > 0):
        raise ValueError(f"temperatures must be > 0, got {dict(zip(label_names, t.tolist(), strict=True))}")
    return t


def apply_temperatures(
    logits: np.ndarray, temperatures: Mapping[str, float], label_names: Sequence[str] = LABELS
) -> np.ndarray:
    """Calibrated probabilities [N, L] = sigmoid(logits / T) per label."""
    return expit(np.asarray(logits, dtype=float) / _vector(temperatures, label_names))


def map_thresholds(
    thresholds: Mapping[str, float | None], temperatures: Mapping[str, float]
) -> dict[str, float | None]:
    """Thresholds on uncalibrated probabilities -> the same cuts on calibrated ones: sigmoid(logit(t) / T).

    A label absent from `temperatures` keeps its threshold; None (never flagged) stays None.
    """
    out: dict[str, float | None] = {}
    for name, t in thresholds.items():
        if t is None or name not in temperatures:
            out[name] = t
            continue
        temp = float(temperatures[name])
        if temp <= 0:
            raise ValueError(f"temperature for {name} must be > 0, got {temp}")
        # The clipped logit of `calibrate_probabilities`: threshold and probabilities take one path.
        out[name] = float(expit(logits_from_probabilities(float(t)) / temp))
    return out


def logits_from_probabilities(probs: np.ndarray) -> np.ndarray:
    """float64 logits of sigmoid probabilities; 0 and 1 (float32 saturation) become finite extremes."""
    p = np.asarray(probs, dtype=np.float64)
    tiny = np.finfo(np.float64).eps
    return logit(np.clip(p, tiny, 1.0 - tiny))


def load_temperatures(config: Mapping[str, Any], where: str = "model config.json") -> dict[str, float] | None:
    """The bundle's ``extra.calibration.temperatures`` (one per label, > 0), or None when none are stored."""
    stored = (config.get("extra") or {}).get(CALIBRATION_KEY)
    if stored is None:
        return None
    temps = stored.get("temperatures") if isinstance(stored, Mapping) else None
    if not isinstance(temps, Mapping):
        raise ValueError(
            f"{where} extra.{CALIBRATION_KEY} must hold a 'temperatures' mapping, got {stored!r}"
        )
    unknown = sorted(set(temps) - set(LABELS))
    if unknown:
        raise ValueError(f"{where} extra.{CALIBRATION_KEY}: unknown label name(s) {unknown}")
    values = {name: float(temps[name]) for name in LABELS if name in temps}
    _vector(values, list(values))
    return values


def calibrate_probabilities(
    probs: np.ndarray, temperatures: Mapping[str, float], label_names: Sequence[str] = LABELS
) -> np.ndarray:
    """float64 [N, L] sigmoid(logit(p) / T); a label without a temperature keeps its probabilities."""
    temps = {name: float(temperatures.get(name, 1.0)) for name in label_names}
    return apply_temperatures(logits_from_probabilities(probs), temps, label_names)


def calibrate_thresholds(thresholds: Thresholds, temperatures: Mapping[str, float]) -> Thresholds:
    """The same operating points on the calibrated scale (`map_thresholds`); flags do not change."""
    values = map_thresholds(thresholds.values, temperatures)
    return replace(thresholds, values=values, method=f"{thresholds.method}, mapped through the temperatures")
