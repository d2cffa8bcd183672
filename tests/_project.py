"""Where the project, its Hydra config and the genuine NIH files are, and the demo's config, for test modules.

Plain constants and functions (no fixtures), so test modules import them by name and `conftest.py` stays
the home of fixtures and hooks only (pytest discourages importing conftest as a module).
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

__all__ = [
    "CONF_DIR",
    "DEMO_IMAGES",
    "DEMO_SIZE",
    "NIH_SHARED",
    "PROJECT_ROOT",
    "compose_cfg",
    "demo_overrides",
]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"
# The genuine NIH sample beside the project; tests reading it carry the `real_nih` marker.
NIH_SHARED = PROJECT_ROOT.parent / "shared" / "nih"
# The data `make demo` makes: enough positives per finding in every split for a stable AUROC.
DEMO_IMAGES, DEMO_SIZE = 600, 128


def compose_cfg(overrides: list[str], output_dir: Path) -> DictConfig:
    """The real Hydra config (conf/config.yaml) with overrides, writing its run into `output_dir`."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*overrides, f"paths.output_dir={output_dir}"])


def demo_overrides(data_dir: Path, *extra: str) -> list[str]:
    return ["experiment=demo", f"paths.data_dir={data_dir}", f"paths.runs_dir={data_dir}/runs", *extra]
