"""Shared fixtures: where the genuine NIH files live (and a skip marker for machines without them), the
tiny model of conf/model/vit_tiny.yaml, and the demo training run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml
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


def _vit_tiny() -> dict[str, Any]:
    """conf/model/vit_tiny.yaml's backbone at the demo's input size (conf/data/synthetic.yaml)."""
    model = yaml.safe_load((CONF_DIR / "model" / "vit_tiny.yaml").read_text())
    data = yaml.safe_load((CONF_DIR / "data" / "synthetic.yaml").read_text())
    return {
        "backbone": model["backbone"],
        "img_size": int(data["input_size"]),
        "patch_size": model["patch_size"],
        "global_pool": model["global_pool"],
    }


@pytest.fixture(scope="session")
def tiny_backbone() -> str:
    """The tiny model's timm name (conf/model/vit_tiny.yaml: ``test_vit``)."""
    return _vit_tiny()["backbone"]


@pytest.fixture(scope="session")
def tiny_backbone_kwargs() -> dict[str, Any]:
    """`create_backbone` / `XrayClassifier` keywords of the tiny model, as the demo builds it: img_size,
    patch_size, global_pool (a fresh dict per session; tests copy it before changing it)."""
    settings = _vit_tiny()
    del settings["backbone"]
    return settings


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
