"""Shared fixtures: where the genuine NIH files live, and a skip marker for machines without them."""

from __future__ import annotations

from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
NIH_SHARED = PROJECT_ROOT.parent / "shared" / "nih"

requires_nih = pytest.mark.skipif(
    not (NIH_SHARED / "Data_Entry_2017_v2020.csv.gz").is_file(),
    reason=f"genuine NIH files not found at {NIH_SHARED} (../shared/nih beside the project)",
)


@pytest.fixture(scope="session")
def nih_shared() -> Path:
    """The folder of genuine NIH files (../shared/nih); tests using it also carry `requires_nih`."""
    if not NIH_SHARED.is_dir():
        pytest.skip(f"genuine NIH files not found at {NIH_SHARED}")
    return NIH_SHARED
