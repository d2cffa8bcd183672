"""The run's Lightning callbacks: the `callbacks` config group, plus what every run needs where it has none.

summary.json's `timing` and `throughput` blocks, and `xraycls cost` after them, need a `RunTimer`; the
YAML entry (conf/callbacks/default.yaml, `run_timer`) only tunes it, so a run without one still times.
`LastCheckpoint` writes checkpoints/last.ckpt at every epoch end (Lightning's `save_last` writes it only when
the monitored metric improves, so a resume would redo every epoch since the best one), and `ResumeLoggers`
tells the loggers where a restored checkpoint left off, so a resumed run keeps its history.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig

from xraycls.training.config import instantiate_group
from xraycls.training.timing import RunTimer

__all__ = [
    "LastCheckpoint",
    "ResumeLoggers",
    "best_checkpoint_callback",
    "checkpoint_step",
    "instantiate_callbacks",
]


class LastCheckpoint(ModelCheckpoint):
    """checkpoints/last.ckpt, overwritten at every epoch end whatever the metrics did, and every
    `every_n_train_steps` optimizer steps within an epoch when set (for long epochs: a crash then loses at
    most that many steps; a mid-epoch resume restarts the epoch's data order, see Lightning's warning).

    Saved when the best checkpoint is (after the epoch's validation, or at the epoch's end without one), so
    a resume from it continues exactly where an uninterrupted run would be. No monitor: its callback state
    is keyed apart from the best checkpoint's, and a resume restores both.
    """

    def __init__(self, dirpath: str | os.PathLike, every_n_train_steps: int | None = None) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be a positive integer or null: {every_n_train_steps}")
        kwargs: dict[str, Any] = {"dirpath": dirpath, "filename": self.CHECKPOINT_NAME_LAST, "monitor": None}
        if "enable_version_counter" in inspect.signature(ModelCheckpoint.__init__).parameters:
            kwargs["enable_version_counter"] = False  # Lightning >= 2.1; 2.0 never versions a file it wrote
        super().__init__(save_top_k=1, every_n_epochs=1, **kwargs)
        self.every_n_steps = every_n_train_steps or 0

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        # ModelCheckpoint's epoch-end hooks call this each epoch (every_n_epochs=1): always the one file.
        filepath = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        self.best_model_path = self.last_model_path = filepath  # part of the saved state
        self._save_checkpoint(trainer, filepath)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        every = self.every_n_steps
        if every < 1 or trainer.global_step % every or self._should_skip_saving_checkpoint(trainer):
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # the epoch-end save follows, after validation: one file per step, the complete one
        self._save_topk_checkpoint(trainer, {})


class ResumeLoggers(L.Callback):
    """When a checkpoint is restored, calls `resume_at(step)` on each logger that has it (our loggers.py):
    that logger keeps what it logged up to the checkpoint's step and drops the later rows, logged again."""

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn != TrainerFn.FITTING:  # validate/test of the best checkpoint: logs go on
            return
        step = checkpoint_step(checkpoint)
        for logger in trainer.loggers:
            if hasattr(logger, "resume_at"):
                logger.resume_at(step)


def checkpoint_step(checkpoint: dict) -> int:
    """The step the loggers logged at when `checkpoint` was saved (Lightning logs at the count of batches
    that stepped the optimizer, which is the global step with one optimizer)."""
    epoch_loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
    return int(epoch_loop.get("_batches_that_stepped", checkpoint.get("global_step", 0)))


def best_checkpoint_callback(callbacks: Iterable[L.Callback], monitor: str) -> ModelCheckpoint | None:
    """The callback that keeps the best checkpoint by `monitor` (else the first that monitors anything):
    not `LastCheckpoint`, which is a ModelCheckpoint too."""
    monitoring = [cb for cb in callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor is not None]
    return next((cb for cb in monitoring if cb.monitor == monitor), next(iter(monitoring), None))


def instantiate_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The `callbacks` group's objects, with a default `RunTimer` added when the group lacks one, and
    `ResumeLoggers`; `trainer.enable_progress_bar=false` drops its progress bar (a plain Trainer refuses a
    bar callback with that setting: the flag wins, as users expect)."""
    callbacks = instantiate_group(cfg.get("callbacks"))
    if not any(isinstance(callback, RunTimer) for callback in callbacks):
        callbacks.append(RunTimer())
    callbacks.append(ResumeLoggers())
    if cfg.trainer.get("enable_progress_bar", True):
        return callbacks
    return [callback for callback in callbacks if not isinstance(callback, ProgressBar)]
