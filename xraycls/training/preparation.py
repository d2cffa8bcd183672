"""Seconds a run's data preparation took, read from the reports the download and the cache left behind.

Preparation is paid once per dataset (and per cache size), not once per run, so a run does not time it:
it reads `ROOT/download_report.json` (`xraycls download`) and `CACHE/prepare_report.json` (`xraycls
prepare`, or the DataModule's `prepare_data`) when the run used them, so that `xraycls cost` can set the
preparation beside the training. Extraction happens inside the download's threads as archives arrive: its
seconds are part of the download's wall time, given alone for information, never to be added to it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from xraycls.data.cache import REPORT_NAME as PREPARE_REPORT_NAME
from xraycls.data.download import DOWNLOAD_REPORT_NAME

__all__ = ["preparation_timing"]

log = logging.getLogger(__name__)


def _read(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        log.warning("unreadable report %s (%s): its seconds are left out of the run's timing", path, error)
        return None
    return report if isinstance(report, dict) else None


def _seconds(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and value >= 0 else None


def preparation_timing(
    root: str | Path | None,
    cache_dir: str | Path | None,
    image_size: int | None,
    *,
    source: str = "cache",
    run_started_at: float | None = None,
) -> tuple[dict[str, float | None], dict[str, Any]]:
    """(timing, provenance) of the data preparation a run used.

    timing: {"download", "extraction", "prepare"} in seconds, None where the run did not use that step or
    no report says. provenance: the report paths read, and `prepare_in_run` (True when the cache report was
    written after `run_started_at`, a `time.time()` value: the run built the cache itself, so its own total
    already holds those seconds).
    """
    timing: dict[str, float | None] = {"download": None, "extraction": None, "prepare": None}
    provenance: dict[str, Any] = {"download_report": None, "prepare_report": None, "prepare_in_run": False}
    if root:
        path = Path(root) / DOWNLOAD_REPORT_NAME
        report = _read(path)
        if report is not None:
            timing["download"] = _seconds(report.get("seconds"))
            if report.get("archives_timed"):
                timing["extraction"] = _seconds(report.get("extract_seconds"))
            provenance["download_report"] = str(path)
    if cache_dir and source == "cache":
        path = Path(cache_dir) / PREPARE_REPORT_NAME
        report = _read(path)
        # One folder holds several sizes, each with its own seconds; the top level is the last size made.
        entry = (report or {}).get("arrays", {}).get(str(image_size))
        if isinstance(entry, dict):
            timing["prepare"] = _seconds(entry.get("seconds"))
            provenance["prepare_report"] = str(path)
            provenance["prepare_in_run"] = (
                run_started_at is not None and path.stat().st_mtime >= run_started_at
            )
    return timing, provenance
