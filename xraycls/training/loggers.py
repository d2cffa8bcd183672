"""CSV and TensorBoard loggers that keep a resumed run's history.

Lightning's CSVLogger deletes the run's metrics.csv when it starts, so a run resumed from last.ckpt lost
every row before the kill (and plots/val_auroc.png its first epochs); TensorBoard kept the old events but
showed the steps between the checkpoint and the kill twice. These loggers keep what the checkpoint covers
and drop only what the resumed run logs again, the rows (events) after the checkpoint's step:
`resume_at(step)` says which, and `xraycls.training.callbacks.ResumeLoggers` calls it when the Trainer
restores a checkpoint. A run that does not resume starts a fresh metrics.csv, as Lightning's does.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from xraycls.files import write_text

__all__ = ["ResumableCSVLogger", "ResumableTensorBoardLogger"]


def _step_of(row: dict[str, str]) -> float | None:
    try:
        return float(row.get("step") or "")
    except ValueError:
        return None


class _ResumableWriter(ExperimentWriter):
    """metrics.csv that survives the writer's start: replaced at the first save, or cut by `resume_at`."""

    def __init__(self, log_dir: str) -> None:
        self._fresh = True  # the first save replaces an old file unless resume_at kept it
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        """Lightning deletes an old metrics.csv here; this writer decides at resume_at or the first save."""

    def resume_at(self, step: int) -> int:
        """Keep the rows logged at `step` or before, drop the later ones; returns how many were kept."""
        self._fresh = False
        if not os.path.isfile(self.metrics_file_path):
            return 0
        with open(self.metrics_file_path, newline="") as file:
            reader = csv.DictReader(file)
            keys, rows = list(reader.fieldnames or []), list(reader)
        kept = [row for row in rows if (row_step := _step_of(row)) is None or row_step <= step]
        self._write(keys, kept)
        self.metrics_keys = keys  # the header the appended rows follow
        return len(kept)

    def save(self) -> None:
        if self.metrics and self._fresh:
            self._fresh = False
            if os.path.isfile(self.metrics_file_path):
                os.remove(self.metrics_file_path)
        super().save()

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        # Lightning rewrites the file in place; a kill then would lose the history this logger keeps.
        with open(self.metrics_file_path, newline="") as file:
            rows = list(csv.DictReader(file))
        self._write(fieldnames, rows)

    def _write(self, fieldnames: list[str], rows: list[dict[str, Any]]) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.metrics_file_path, text.getvalue())


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger (same arguments, same metrics.csv) that appends to a resumed run's file."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _ResumableWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumableWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def resume_at(self, step: int) -> None:
        """The run resumes after optimizer step `step`: keep the rows up to it, append from there."""
        self.experiment.resume_at(step)


class ResumableTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoardLogger whose resumed run hides the old events after the checkpoint's step
    (SummaryWriter's `purge_step`), so TensorBoard shows each step once."""

    @rank_zero_only
    def resume_at(self, step: int) -> None:
        """The run resumes after optimizer step `step`: events at later steps are logged again."""
        self._kwargs["purge_step"] = step + 1
        if self._experiment is not None:  # opened already (hyperparameters): reopen with the purge step
            self._experiment.close()
            self._experiment = None
