"""What a resume keeps: last.ckpt at every epoch end (and every N steps), metrics.csv rows up to the
checkpoint, TensorBoard's purge step, the best-checkpoint callback found among two, the plot's fit epochs.
The end-to-end kill-and-resume test is in test_train.py."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from _project import compose_cfg
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from xraycls.findings import NUM_LABELS
from xraycls.model.checkpoint import open_checkpoint
from xraycls.model.module import XrayClassifier
from xraycls.report import plots
from xraycls.training import instantiate_callbacks
from xraycls.training.callbacks import LastCheckpoint, ResumeLoggers, best_checkpoint_callback
from xraycls.training.loggers import ResumableCSVLogger, ResumableTensorBoardLogger


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _log_steps(logger: ResumableCSVLogger, steps: range, key: str = "train/loss") -> None:
    for step in steps:
        logger.log_metrics({key: float(step)}, step=step)
        logger.save()


def test_csv_logger_keeps_the_rows_up_to_the_checkpoint_and_appends(tmp_path: Path) -> None:
    first = ResumableCSVLogger(tmp_path, name="", version="")
    first.log_hyperparams({"lr": 1e-3})
    _log_steps(first, range(10))  # a run killed after step 9, its checkpoint at step 4
    resumed = ResumableCSVLogger(tmp_path, name="", version="")
    resumed.log_hyperparams({"lr": 1e-3})  # opening the writer deletes nothing
    assert len(_rows(tmp_path / "metrics.csv")) == 10
    resumed.resume_at(4)
    _log_steps(resumed, range(5, 8))
    _log_steps(resumed, range(8, 9), key="val/loss")  # a new column: the file is rewritten, rows kept
    rows = _rows(tmp_path / "metrics.csv")
    assert [int(row["step"]) for row in rows] == list(range(9))
    assert [row["train/loss"] for row in rows[:8]] == [str(float(step)) for step in range(8)]
    assert rows[8]["val/loss"] == "8.0" and list(rows[0]) == ["step", "train/loss", "val/loss"]


def test_csv_logger_without_a_resume_starts_a_fresh_file(tmp_path: Path) -> None:
    _log_steps(ResumableCSVLogger(tmp_path, name="", version=""), range(10))
    fresh = ResumableCSVLogger(tmp_path, name="", version="")
    _log_steps(fresh, range(3), key="other")
    assert [list(row) for row in _rows(tmp_path / "metrics.csv")] == [["other", "step"]] * 3


def test_tensorboard_logger_purges_the_steps_after_the_checkpoint(tmp_path: Path) -> None:
    logger = ResumableTensorBoardLogger(tmp_path, name="", version="", default_hp_metric=False)
    opened = logger.experiment
    logger.resume_at(24)
    assert logger._kwargs["purge_step"] == 25
    assert logger.experiment is not opened  # reopened with it (SummaryWriter clears it once applied)


def test_the_callbacks_keep_the_best_and_the_last_checkpoint_apart(tmp_path: Path) -> None:
    callbacks = instantiate_callbacks(compose_cfg([], tmp_path))
    (best,) = [
        cb for cb in callbacks if isinstance(cb, ModelCheckpoint) and not isinstance(cb, LastCheckpoint)
    ]
    (last,) = [cb for cb in callbacks if isinstance(cb, LastCheckpoint)]
    assert best.monitor == "val/auroc_macro14" and not best.save_last
    assert last.monitor is None and last.every_n_steps == 0
    assert best.state_key != last.state_key  # a checkpoint restores each its own state
    assert any(isinstance(cb, ResumeLoggers) for cb in callbacks)
    assert best_checkpoint_callback([last, best], "val/auroc_macro14") is best
    assert best_checkpoint_callback([last], "val/auroc_macro14") is None
    cfg = compose_cfg(["callbacks.last_checkpoint.every_n_train_steps=100"], tmp_path)
    (last,) = [cb for cb in instantiate_callbacks(cfg) if isinstance(cb, LastCheckpoint)]
    assert last.every_n_steps == 100
    with pytest.raises(ValueError, match="every_n_train_steps"):
        LastCheckpoint(tmp_path, every_n_train_steps=0)


class _RecordLast(L.Callback):
    """Before each batch, the global step last.ckpt holds (Lightning runs checkpoint callbacks last)."""

    def __init__(self, path: Path) -> None:
        self.path, self.steps = path, []

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        self.steps.append(open_checkpoint(self.path)["global_step"] if self.path.is_file() else None)


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_last_checkpoint_every_n_steps_and_every_epoch_end(
    tmp_path: Path, cpu_trainer: Callable[..., L.Trainer], tiny_backbone: str, tiny_backbone_kwargs: dict
) -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(20, 3, 64, 64, generator=generator)
    labels = (torch.rand(20, NUM_LABELS, generator=generator) < 0.5).float()
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)  # 5 steps an epoch
    module = XrayClassifier(backbone=tiny_backbone, weights="none", **tiny_backbone_kwargs)
    record = _RecordLast(tmp_path / "last.ckpt")
    callbacks = [LastCheckpoint(tmp_path, every_n_train_steps=2), record]
    trainer = cpu_trainer(max_epochs=2, callbacks=callbacks, enable_checkpointing=True, limit_val_batches=1)
    trainer.fit(module, loader, loader)
    # Saved at steps 2 and 4, the epoch's end (5, after validation, not at its last batch), 6, 8, then 10.
    assert record.steps == [None, None, 2, 2, 4, 5, 6, 6, 8, 8]
    checkpoint = open_checkpoint(tmp_path / "last.ckpt")
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (1, 10)
    assert sorted(path.name for path in tmp_path.glob("*.ckpt")) == ["last.ckpt"]


def test_the_auroc_plot_shows_the_fit_epochs_not_the_evaluation_after_it() -> None:
    nan = np.nan
    table = pd.DataFrame(
        {  # two epochs, then the best checkpoint validated and tested after fit (Lightning: epoch 2)
            "epoch": [0, 0, 0, 1, 1, 1, 2, 2],
            "step": [4, 4, 4, 9, 9, 9, 10, 10],
            "train/loss": [0.5, nan, nan, 0.4, nan, nan, nan, nan],
            "val/auroc_macro14": [nan, 0.6, nan, nan, 0.55, nan, 0.6, nan],
            "train/loss_epoch": [nan, nan, 0.5, nan, nan, 0.4, nan, nan],
            "test/auroc_macro14": [nan] * 7 + [0.58],
        }
    )
    (ax,) = plots._val_auroc_figure(table).axes
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [0, 1])
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), [0.6, 0.55])
    without_epoch_rows = table.drop(columns="train/loss_epoch")  # another logger's CSV: every row is kept
    (ax,) = plots._val_auroc_figure(without_epoch_rows).axes
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [0, 1, 2])
