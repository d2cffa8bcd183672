"""RunTimer under a real CPU Trainer: steps that sleep known times make every number checkable."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from xraycls.training.timing import RunTimer

BATCH = 4


class SleepyModule(L.LightningModule):
    """A linear model whose steps sleep: `slow` for the first `slow_batches` of each training epoch."""

    def __init__(
        self,
        slow: float = 0.0,
        fast: float = 0.0,
        slow_batches: int = 0,
        val: float = 0.0,
        test: float = 0.0,
        compile_layer: bool = False,
        first_extra: float = 0.0,
    ) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        if compile_layer:
            self.layer.compile(backend="eager")  # tracing without code generation: fast on a CPU
        self.slow, self.fast, self.slow_batches = slow, fast, slow_batches
        self.val, self.test, self.first_extra = val, test, first_extra
        self.seen = 0

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        time.sleep(self.slow if batch_idx < self.slow_batches else self.fast)
        if self.seen == 0:
            time.sleep(self.first_extra)
        self.seen += 1
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        time.sleep(self.val)

    def test_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        time.sleep(self.test)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(batches: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(batches * BATCH, 4)), batch_size=BATCH)


SLOW, FAST, VAL, TEST = 0.25, 0.04, 0.1, 0.03


@pytest.fixture(scope="module")
def timed_run(
    tmp_path_factory: pytest.TempPathFactory, cpu_trainer: Callable[..., L.Trainer]
) -> tuple[dict[str, Any], float]:
    """2 epochs x 8 train batches (first 2 of each slow), 4 val batches per epoch, then 5 test batches."""
    timer = RunTimer(warmup_batches=2)
    module = SleepyModule(slow=SLOW, fast=FAST, slow_batches=2, val=VAL, test=TEST)
    root = tmp_path_factory.mktemp("timer")
    trainer = cpu_trainer(default_root_dir=root, callbacks=[timer], max_epochs=2, num_sanity_val_steps=2)
    start = time.perf_counter()
    trainer.fit(module, _loader(8), _loader(4))
    fit_wall = time.perf_counter() - start
    trainer.test(module, _loader(5), verbose=False)
    return timer.as_dict(), fit_wall


@pytest.mark.slow
def test_reports_every_phase(timed_run: tuple[dict[str, Any], float]) -> None:
    result, _ = timed_run
    timing, throughput = result["timing"], result["throughput"]
    assert set(timing) == {"setup", "sanity_check", "compile", "train", "validate", "test", "epochs"}
    assert {"train_images_per_s", "eval_images_per_s", "warmup_batches"} <= set(throughput)
    assert throughput["warmup_batches"] == 2
    assert timing["compile"] is None  # nothing compiled
    # Lower bounds from the sleeps: 2 sanity batches, 2 x (2 slow + 6 fast), 2 x 4 val, 5 test batches.
    assert timing["sanity_check"] >= 2 * VAL
    assert timing["setup"] >= timing["sanity_check"]
    assert timing["train"] >= 2 * (2 * SLOW + 6 * FAST)
    assert timing["validate"] >= 2 * 4 * VAL
    assert timing["test"] >= 5 * TEST


@pytest.mark.slow
def test_phases_add_up_without_double_counting(timed_run: tuple[dict[str, Any], float]) -> None:
    result, fit_wall = timed_run
    timing = result["timing"]
    epochs = timing["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert sum(e["train"] for e in epochs) == pytest.approx(timing["train"], rel=1e-9)
    assert sum(e["validate"] for e in epochs) == pytest.approx(timing["validate"], rel=1e-9)
    for epoch in epochs:
        assert epoch["train"] >= 2 * SLOW + 6 * FAST
        assert epoch["validate"] >= 4 * VAL
    # Validation runs inside each training epoch: counted in train too, the sum would exceed the fit's
    # wall time by 0.8 s; the fit's own set-up and teardown outside these phases are small.
    covered = timing["setup"] + timing["train"] + timing["validate"]
    assert covered <= fit_wall + 0.01
    assert covered >= 0.8 * fit_wall


@pytest.mark.slow
def test_throughput_leaves_out_warmup_batches(timed_run: tuple[dict[str, Any], float]) -> None:
    throughput = timed_run[0]["throughput"]
    # Exact counts: 2 epochs x 6 batches after warm-up; eval 2 runs x 2 val batches + 3 test batches, and
    # nothing from the sanity check.
    assert throughput["train_images_measured"] == 2 * 6 * BATCH
    assert throughput["eval_images_measured"] == (2 * 2 + 3) * BATCH
    # After warm-up a batch takes >= FAST seconds: at most BATCH / FAST images/s; with the slow warm-up
    # batches included it would be 8 * BATCH / (2 * SLOW + 6 * FAST) = 43 images/s.
    train_rate = throughput["train_images_per_s"]
    assert 0.6 * BATCH / FAST <= train_rate <= 1.02 * BATCH / FAST
    val_rate, test_rate = throughput["validate_images_per_s"], throughput["test_images_per_s"]
    assert 0.6 * BATCH / VAL <= val_rate <= 1.02 * BATCH / VAL
    assert 0.6 * BATCH / TEST <= test_rate <= 1.02 * BATCH / TEST
    # Eval combines both: images over summed time lies between the two rates.
    assert val_rate < throughput["eval_images_per_s"] < test_rate
    assert throughput["notes"] == []


@pytest.mark.slow
def test_too_few_batches_for_warmup_gives_no_throughput(
    tmp_path: Path, cpu_trainer: Callable[..., L.Trainer]
) -> None:
    timer = RunTimer(warmup_batches=5)
    trainer = cpu_trainer(default_root_dir=tmp_path, callbacks=[timer], max_epochs=1)
    trainer.fit(SleepyModule(fast=0.01), _loader(3), _loader(2))
    result = timer.as_dict()
    assert result["throughput"]["train_images_per_s"] is None
    assert result["throughput"]["eval_images_per_s"] is None
    assert result["throughput"]["train_images_measured"] == 0
    notes = " ".join(result["throughput"]["notes"])
    assert "train: no run had more than 5 batches" in notes and "validate:" in notes
    assert result["timing"]["train"] >= 3 * 0.01
    assert result["timing"]["test"] is None  # never tested
    assert result["timing"]["sanity_check"] is None


@pytest.mark.slow
def test_compile_time_is_the_first_batch_extra(tmp_path: Path, cpu_trainer: Callable[..., L.Trainer]) -> None:
    timer = RunTimer(warmup_batches=1)
    module = SleepyModule(fast=0.02, first_extra=0.3, compile_layer=True)
    trainer = cpu_trainer(default_root_dir=tmp_path, callbacks=[timer], max_epochs=1, limit_val_batches=0)
    trainer.fit(module, _loader(6))
    compile_s = timer.as_dict()["timing"]["compile"]
    # 0.3 s of planted extra work plus dynamo's tracing, minus the ~0.02 s of a regular batch.
    assert compile_s is not None and compile_s >= 0.3 - 0.03


def test_rejects_a_negative_warmup() -> None:
    with pytest.raises(ValueError, match="warmup_batches must be an int >= 0, got -1"):
        RunTimer(warmup_batches=-1)
