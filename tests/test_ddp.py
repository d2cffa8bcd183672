"""DDP on the CPU with two real processes (gloo), through `run_training` and `hardware.devices=2`.

The whole-set AUROC that the DDP run writes to summary.json must equal the AUROC of one process over the
same data with the same weights: training samples are sharded between ranks, evaluation samples are
sharded WITHOUT padding (Lightning's default DistributedSampler repeats images to even out the ranks,
which would count them twice), and torchmetrics gathers every rank's predictions before computing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
from _project import PROJECT_ROOT
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from torch.utils.data import DataLoader, DistributedSampler

from xraycls.data.datamodule import eval_sampler
from xraycls.data.datasets import EpochSeededSampler
from xraycls.data.synthetic import make_synthetic_nih
from xraycls.findings import LABELS
from xraycls.model.module import XrayClassifier

WORKER = PROJECT_ROOT / "tests" / "_ddp_worker.py"
# A short run: the comparison needs any trained weights, not good ones.
RUN_OVERRIDES = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.enable_progress_bar=false",
    "export_model=false",
    "plots=false",
]


def test_training_sampler_gives_each_rank_distinct_images_and_follows_the_epoch() -> None:
    # What Lightning wraps EpochSeededSampler in under DDP (use_distributed_sampler=True).
    def shards(epoch: int) -> list[list[tuple[int, int]]]:
        out = []
        for rank in range(2):
            wrapper = DistributedSamplerWrapper(EpochSeededSampler(10, seed=3), num_replicas=2, rank=rank)
            wrapper.set_epoch(epoch)
            out.append(list(wrapper))
        return out

    first = shards(0)
    positions = [[position for position, _ in shard] for shard in first]
    assert not set(positions[0]) & set(positions[1])
    assert sorted(positions[0] + positions[1]) == list(range(10))
    # set_epoch reaches the inner sampler: new order and new augmentation seeds next epoch.
    assert shards(1) != first and shards(0) == first


def test_eval_shards_cover_every_image_once_where_the_default_sampler_repeats() -> None:
    dataset = list(range(11))  # odd: two ranks cannot split it evenly
    loaders = [DataLoader(dataset, batch_size=4, sampler=eval_sampler(dataset, rank, 2)) for rank in range(2)]
    unpadded = [int(x) for loader in loaders for batch in loader for x in batch]
    assert sorted(unpadded) == dataset
    padded = [i for rank in range(2) for i in DistributedSampler(dataset, 2, rank, shuffle=False)]
    assert len(padded) == 12 and len(set(padded)) == 11  # the bias the unpadded sampler removes
    assert eval_sampler(dataset, 0, 1) is None and eval_sampler(dataset) is None  # one process: plain order


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    data = tmp_path_factory.mktemp("ddp_data")
    make_synthetic_nih(data / "demo" / "raw", 600, size=128, seed=0, min_prevalence=0.08)
    run_dir = data / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    done = subprocess.run(
        [sys.executable, str(WORKER), str(data), str(run_dir), *RUN_OVERRIDES],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return data, run_dir, json.loads((run_dir / "summary.json").read_text())


def _single_process_metrics(
    trainer: L.Trainer, data: Path, checkpoint: str, stage: str
) -> tuple[dict, object]:
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["experiment=demo", f"paths.data_dir={data}", f"paths.output_dir={data}/single"],
        )
    datamodule = instantiate(cfg.data)
    model = XrayClassifier.load_from_checkpoint(checkpoint, weights="none")
    getattr(trainer, stage)(model, datamodule=datamodule, verbose=False)
    return model.last_metrics["val" if stage == "validate" else "test"], datamodule


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")  # restores the count: later tests must not inherit 1 thread
def test_ddp_auroc_equals_the_single_process_auroc(
    ddp_run: tuple[Path, Path, dict], cpu_trainer: Callable[..., L.Trainer]
) -> None:
    data, run_dir, summary = ddp_run
    hardware = summary["hardware"]
    assert (hardware["replicas"], hardware["strategy"], hardware["devices"]) == (2, "ddp", 2)
    assert hardware["global_batch"] == hardware["micro_batch"] * 2 * hardware["accumulation"] == 16
    for stage, part in (("validate", "val"), ("test", "test")):
        single, datamodule = _single_process_metrics(cpu_trainer(), data, summary["best_checkpoint"], stage)
        ddp = summary["metrics"][part]
        for label in LABELS:
            expected = single["auroc_per_finding"][label]
            assert ddp["auroc_per_finding"][label] == pytest.approx(expected, abs=1e-6), (part, label)
        assert ddp["auroc_macro14"] == pytest.approx(single["auroc_macro14"], abs=1e-6)
        assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-5)
        if part == "val":  # the thresholds were chosen on both ranks' gathered rows: every image once
            assert summary["thresholds"]["images"] == len(datamodule.datasets["val"])
    # 141 test images: the default sampler would have repeated one, and the AUROC would differ.
    assert len(datamodule.datasets["test"]) % 2 == 1


@pytest.mark.slow
def test_ddp_writes_checkpoints_and_summary_once(ddp_run: tuple[Path, Path, dict]) -> None:
    _data, run_dir, summary = ddp_run
    names = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    assert names == ["best-epoch00.ckpt", "last.ckpt"], names
    assert Path(summary["best_checkpoint"]).parent == run_dir / "checkpoints"
    # One summary, from rank 0, whose hardware block is the resolved plan of `hardware.devices=2`.
    assert summary["hardware"]["name"] == "cpu" and summary["hardware"]["source"] == "config"
