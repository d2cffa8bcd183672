"""Test-only Lightning callbacks, importable by the train.py subprocesses the tests start (PYTHONPATH)."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAtEpochStart(L.Callback):
    """SIGKILLs its own process when epoch `epoch` starts: the previous epoch's checkpoints are on disk, and
    nothing gets a chance to clean up, as with a preempted job or a power cut."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)
