"""The run's Lightning callbacks: the `callbacks` config group, plus a `RunTimer` where the group has none.

summary.json's `timing` and `throughput` blocks, and `xraycls cost` after them, need a `RunTimer`; the
YAML entry (conf/callbacks/default.yaml, `run_timer`) only tunes it, so a run without one still times.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig

from xraycls.training.config import instantiate_group
from xraycls.training.timing import RunTimer

__all__ = ["instantiate_callbacks"]


def instantiate_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The `callbacks` group's objects, with a default `RunTimer` added when the group lacks one;
    `trainer.enable_progress_bar=false` drops its progress bar (a plain Trainer refuses a bar callback with
    that setting: the flag wins, as users expect)."""
    callbacks = instantiate_group(cfg.get("callbacks"))
    if not any(isinstance(callback, RunTimer) for callback in callbacks):
        callbacks.append(RunTimer())
    if cfg.trainer.get("enable_progress_bar", True):
        return callbacks
    return [callback for callback in callbacks if not isinstance(callback, ProgressBar)]
