"""Shared fixtures and marker hooks: the demo data and run, the tiny model of conf/model/vit_tiny.yaml, one
torch thread, a quiet CPU Trainer; `real_nih` skips where ../shared/nih is absent, `gpu` where CUDA is.
Paths and config helpers are in `_project.py`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from _project import CONF_DIR, DEMO_IMAGES, DEMO_SIZE, NIH_SHARED, compose_cfg, demo_overrides


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`real_nih` and `gpu` carry their own skip, so a test needs only the marker."""
    skips = {}
    if not (NIH_SHARED / "Data_Entry_2017_v2020.csv.gz").is_file():
        reason = f"genuine NIH files not found at {NIH_SHARED} (../shared/nih beside the project)"
        skips["real_nih"] = pytest.mark.skip(reason=reason)
    if any(item.get_closest_marker("gpu") for item in items):
        import torch  # only when a gpu test is collected

        if not torch.cuda.is_available():
            skips["gpu"] = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        for name, skip in skips.items():
            if item.get_closest_marker(name):
                item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread while a module runs (`pytestmark = pytest.mark.usefixtures(...)`): on a small,
    shared CPU, OpenMP threads spinning against other processes made a tiny fit 25x slower (27 s instead
    of 1 s on 2 busy cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cpu_trainer() -> Callable[..., Any]:
    """Builds a `lightning.Trainer` on one CPU without logger, checkpoints, progress bar, model summary or
    sanity validation; keyword arguments add to or replace those settings."""

    def make(**kwargs: Any) -> Any:
        import lightning as L

        settings = {
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            **kwargs,
        }
        return L.Trainer(**settings)

    return make


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


@pytest.fixture(scope="session")
def tiny_bundle_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_backbone: str, tiny_backbone_kwargs: dict[str, Any]
) -> Path:
    """model/ of a randomly initialised tiny ViT (nothing trained): for tests of what reads a bundle."""
    from xraycls.findings import NUM_LABELS
    from xraycls.inference.bundle import export_bundle, make_preprocessing
    from xraycls.model.backbone import create_backbone

    kwargs = {"num_classes": NUM_LABELS, **tiny_backbone_kwargs}
    size = int(kwargs["img_size"])
    return export_bundle(
        create_backbone(tiny_backbone, weights="none", **kwargs),
        tmp_path_factory.mktemp("tiny_bundle") / "model",
        backbone_name=tiny_backbone,
        backbone_kwargs=kwargs,
        preprocessing=make_preprocessing(size, size),
    )


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
    a trained model: training it once keeps the suite within its time budget. Tests using it are `slow`."""
    from xraycls.training import run_training

    run_dir = tmp_path_factory.mktemp("demo_run")
    start = time.perf_counter()
    summary = run_training(compose_cfg(demo_overrides(data_dir), run_dir))
    return run_dir, summary, time.perf_counter() - start
