"""Where a run's time goes: a Lightning callback timing each phase and measuring images/s after warm-up.

What `RunTimer.as_dict` reports (seconds of wall time, `time.perf_counter`, CUDA synchronised before each
clock reading when the model is on a GPU):

- ``setup``: from the callback's ``setup`` hook of ``fit`` to the start of the first training batch:
  strategy and model set-up, the sanity-check validation (also given alone as ``sanity_check``) and the
  fetch of the first batch (DataLoader worker start-up). It overlaps the first epoch's ``train`` time by
  that first fetch.
- ``compile``: only when the model (or a submodule) is compiled (`torch.compile`, `nn.Module.compile`):
  the duration of the first training batch (start to end hook: tracing, code generation, forward and
  backward) minus the mean time per training batch after warm-up. NOTE: the first batch also pays one-off
  costs that exist without compiling (CUDA context and kernel autotuning, allocator growth), so this is
  an upper bound; the eval graph compiled at the first validation batch (often inside the sanity check)
  is not included. None otherwise, or when no batch after warm-up was measured.
- ``train``, ``validate``, ``test``: wall time of those loops, summed over runs; validation inside an
  epoch is not training time. None for a loop that never ran. ``epochs``: per epoch ``train`` and
  ``validate`` (the validation runs started in that epoch).
- ``throughput``: images/s over the batches after the first `warmup_batches` of every loop run (each
  epoch, each validation, each test), from the end of the last warm-up batch to the end of the run, data
  loading included. Images are counted from the length of the batch's first tensor, on this process, and
  multiplied by the world size (DDP samplers give every rank as many batches). ``eval_images_per_s``
  covers validation (not the sanity check) and test together; both are also given alone. A throughput is
  None when no run had more batches than the warm-up; ``notes`` then says so.

Only per-run boundaries read the clock (and synchronise CUDA), never every batch, so timing does not
stall the host-device pipeline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import Tensor

__all__ = ["RunTimer"]

log = logging.getLogger(__name__)


@dataclass
class _LoopClock:
    """Wall time of one kind of loop over its runs, and its throughput window after warm-up."""

    warmup: int
    total: float = 0.0  # seconds the loop was active, summed over runs
    runs: int = 0
    measured_time: float = 0.0  # seconds inside throughput windows
    measured_images: int = 0
    measured_batches: int = 0
    # State of the current run.
    in_run: bool = False
    batches: int = 0
    active_since: float | None = None
    window_since: float | None = None
    window_open: bool = False
    run_start_total: float = field(default=0.0, repr=False)

    def start(self, now: float) -> None:
        self.runs += 1
        self.in_run = True
        self.batches = 0
        self.active_since = now
        self.run_start_total = self.total
        self.window_open = self.warmup == 0
        self.window_since = now if self.window_open else None

    def pause(self, now: float) -> None:
        if self.active_since is None:
            return
        self.total += now - self.active_since
        self.active_since = None
        if self.window_since is not None:
            self.measured_time += now - self.window_since
            self.window_since = None

    def resume(self, now: float) -> None:
        if not self.in_run or self.active_since is not None:
            return
        self.active_since = now
        if self.window_open:
            self.window_since = now

    def batch_end(self, images: int, clock: Any) -> None:
        """Count a finished batch; `clock()` is read only at the end of the warm-up."""
        self.batches += 1
        if self.window_open:
            self.measured_images += images
            self.measured_batches += 1
        elif self.batches == self.warmup:
            self.window_open = True
            self.window_since = clock()

    def stop(self, now: float) -> float:
        """End the run; returns its active seconds."""
        self.pause(now)
        self.in_run = False
        self.window_open = False
        return self.total - self.run_start_total

    def rate(self, world_size: int) -> float | None:
        if self.measured_batches == 0 or self.measured_time <= 0:
            return None
        return self.measured_images * world_size / self.measured_time


def _batch_len(batch: Any) -> int:
    """Images in a batch: the length of its first tensor (batch, (images, labels), {"images": ...})."""
    while not isinstance(batch, Tensor):
        if isinstance(batch, Mapping) and batch:
            batch = next(iter(batch.values()))
        elif isinstance(batch, Sequence) and not isinstance(batch, str) and batch:
            batch = batch[0]
        else:
            return 0
    return len(batch) if batch.ndim else 0


def _is_compiled(module: torch.nn.Module) -> bool:
    # nn.Module.compile sets _compiled_call_impl; torch.compile(m) wraps m in an OptimizedModule (_orig_mod).
    return any(
        getattr(m, "_compiled_call_impl", None) is not None or hasattr(m, "_orig_mod")
        for m in module.modules()
    )


class RunTimer(L.Callback):
    """Times setup, compile, train, validate and test and measures throughput; see the module doc.

    `warmup_batches` batches at the start of every loop run are left out of the throughput (data loader
    start-up, compilation, autotuning). Read the result with `as_dict()` after `fit`/`test`.
    """

    def __init__(self, warmup_batches: int = 5) -> None:
        if not isinstance(warmup_batches, int) or warmup_batches < 0:
            raise ValueError(f"warmup_batches must be an int >= 0, got {warmup_batches!r}")
        self.warmup_batches = warmup_batches
        self._train = _LoopClock(warmup_batches)
        self._validate = _LoopClock(warmup_batches)
        self._test = _LoopClock(warmup_batches)
        self._device: torch.device | None = None
        self._world_size = 1
        self._setup_start: float | None = None
        self._setup: float | None = None
        self._sanity_start: float | None = None
        self._sanity: float | None = None
        self._compiled = False
        self._first_batch_start: float | None = None
        self._first_batch: float | None = None
        self._epochs: dict[int, dict[str, float]] = {}
        self._val_epoch: int | None = None

    # ------------------------------------------------------------------------------------------- clock
    def _now(self) -> float:
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        return time.perf_counter()

    def _track(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._device = pl_module.device
        self._world_size = max(int(trainer.world_size), 1)

    def _epoch(self, epoch: int) -> dict[str, float]:
        return self._epochs.setdefault(epoch, {"epoch": epoch, "train": 0.0, "validate": 0.0})

    # ------------------------------------------------------------------------------------------- setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self._setup_start is None:
            self._track(trainer, pl_module)
            self._setup_start = self._now()

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._track(trainer, pl_module)
        self._sanity_start = self._now()

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._sanity_start is not None:
            self._sanity = (self._sanity or 0.0) + self._now() - self._sanity_start
            self._sanity_start = None

    # ------------------------------------------------------------------------------------------- train
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._track(trainer, pl_module)
        self._compiled = _is_compiled(pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train.start(self._now())

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._setup is None and self._setup_start is not None:
            now = self._now()
            self._setup = now - self._setup_start
            if self._compiled:
                self._first_batch_start = now

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._first_batch_start is not None and self._first_batch is None:
            self._first_batch = self._now() - self._first_batch_start
        self._train.batch_end(_batch_len(batch), self._now)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch(trainer.current_epoch)["train"] += self._train.stop(self._now())

    # -------------------------------------------------------------------------------------- validation
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._track(trainer, pl_module)
        now = self._now()
        self._train.pause(now)  # validation inside an epoch is not training time
        fitting = trainer.state.fn == "fit"
        self._val_epoch = trainer.current_epoch if fitting else None
        self._validate.start(now)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._validate.batch_end(_batch_len(batch), self._now)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        now = self._now()
        seconds = self._validate.stop(now)
        if self._val_epoch is not None:
            self._epoch(self._val_epoch)["validate"] += seconds
        self._train.resume(now)  # no-op outside a training epoch

    # -------------------------------------------------------------------------------------------- test
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._track(trainer, pl_module)
        self._test.start(self._now())

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._test.batch_end(_batch_len(batch), self._now)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._test.stop(self._now())

    # ------------------------------------------------------------------------------------------ report
    def _compile_seconds(self) -> float | None:
        clock = self._train
        if self._first_batch is None or clock.measured_batches == 0:
            return None
        return max(self._first_batch - clock.measured_time / clock.measured_batches, 0.0)

    def as_dict(self) -> dict[str, Any]:
        """{"timing": {...}, "throughput": {...}} as described in the module doc; seconds and images/s."""
        world = self._world_size
        eval_images = self._validate.measured_images + self._test.measured_images
        eval_time = self._validate.measured_time + self._test.measured_time
        eval_rate = eval_images * world / eval_time if eval_images and eval_time > 0 else None
        notes = []
        for name, clock in (("train", self._train), ("validate", self._validate), ("test", self._test)):
            if clock.runs and clock.measured_batches == 0:
                notes.append(
                    f"{name}: no run had more than {self.warmup_batches} batches (the warm-up), "
                    f"so no {name} throughput was measured"
                )
        if self._compiled and self._compile_seconds() is None:
            notes.append("compile: the model is compiled but no training batch after warm-up was measured")
        return {
            "timing": {
                "setup": self._setup,
                "sanity_check": self._sanity,
                "compile": self._compile_seconds(),
                "train": self._train.total if self._train.runs else None,
                "validate": self._validate.total if self._validate.runs else None,
                "test": self._test.total if self._test.runs else None,
                "epochs": [dict(self._epochs[epoch]) for epoch in sorted(self._epochs)],
            },
            "throughput": {
                "train_images_per_s": self._train.rate(world),
                "eval_images_per_s": eval_rate,
                "validate_images_per_s": self._validate.rate(world),
                "test_images_per_s": self._test.rate(world),
                "train_images_measured": self._train.measured_images * world,
                "eval_images_measured": eval_images * world,
                "warmup_batches": self.warmup_batches,
                "world_size": world,
                "notes": notes,
            },
        }
