"""Shared fixtures: where the genuine NIH files live, and a skip marker for machines without them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

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


CONF_DIR = PROJECT_ROOT / "conf"
# The data `make demo` makes: enough positives per finding in every split for a stable AUROC.
DEMO_IMAGES, DEMO_SIZE = 600, 128


def compose_cfg(overrides: list[str], output_dir: Path) -> DictConfig:
    """The real Hydra config (conf/config.yaml) with overrides, writing its run into `output_dir`."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*overrides, f"paths.output_dir={output_dir}"])


def demo_overrides(data_dir: Path, *extra: str) -> list[str]:
    return ["experiment=demo", f"paths.data_dir={data_dir}", f"paths.runs_dir={data_dir}/runs", *extra]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """paths.data_dir holding demo/raw: the synthetic set `make demo` makes."""
    from xraycls.data.synthetic import make_synthetic_nih

    data = tmp_path_factory.mktemp("data")
    make_synthetic_nih(data / "demo" / "raw", DEMO_IMAGES, size=DEMO_SIZE, seed=0, min_prevalence=0.08)
    return data


@pytest.fixture(scope="session")
def demo_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, float]:
    """(run directory, summary, seconds) of one `experiment=demo` run, shared by every test module that needs
    a trained model: training it once keeps the suite within its time budget."""
    from xraycls.training import run_training

    run_dir = tmp_path_factory.mktemp("demo_run")
    start = time.perf_counter()
    summary = run_training(compose_cfg(demo_overrides(data_dir), run_dir))
    return run_dir, summary, time.perf_counter() - start
