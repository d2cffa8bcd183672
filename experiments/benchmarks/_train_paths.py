"""The measured paths of `train_throughput.py`: a bare timm loop and the project's Lightning path.

Each path trains `warmup_steps + steps` optimizer steps (or evaluates `eval_warmup_steps + eval_steps`
batches) and returns a `Window`: the images, wall seconds and process CPU seconds from the end of the last
warm-up batch to the end of the last batch, so the window holds exactly `steps` whole iterations of
everything the loop does per batch (data fetch, step, hooks, logging). The clock is read after
`torch.cuda.synchronize` when the model is on a GPU, at the two window ends only, never per batch.

- `BareLoop`: `timm.create_model` (+ `nn.Module.compile`), AdamW over timm's weight-decay groups, the
  per-step warm-up cosine `LambdaLR`, `torch.autocast` for bf16-mixed, BCE-with-logits in float32;
  eval under `torch.inference_mode`. Fed `DeviceBatches`: float32 images already on the device and
  already normalised, float32 0/1 labels [B, 15].
- `LightningPath`: `XrayClassifier` + a real `lightning.Trainer`, fed the same `DeviceBatches` or an
  `NIHDataModule` (uint8 cache -> workers -> device -> `DeviceNormalize`). `TrainerSetup` says how the
  Trainer is configured; `PROJECT_SETUP` mirrors `conf/trainer/default.yaml`, `conf/callbacks/default.yaml`
  and `logger=csv`, except that checkpointing and the model summary are off (they act at epoch end and
  fit start, outside the window) and no validation runs inside `fit` (validation is measured on its own).
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import timm
import torch
import torch.nn.functional as F
from _train_config import BenchConfig, DeviceBatches, Window, now, seeded, window
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from timm.optim import param_groups_weight_decay

from xraycls.findings import NUM_LABELS
from xraycls.model.module import XrayClassifier
from xraycls.model.schedule import warmup_cosine
from xraycls.training.timing import RunTimer

__all__ = ["TrainerSetup", "PROJECT_SETUP", "make_module", "BareLoop", "LightningPath"]


@dataclasses.dataclass(frozen=True)
class TrainerSetup:
    """How a `LightningPath` configures its Trainer (and whether the module does its per-batch host work)."""

    name: str
    progress_bar_refresh_rate: int = 10  # the TQDMProgressBar of conf/callbacks/default.yaml; 0: no bar
    csv_logger: bool = True  # logger=csv, writing every `log_every_n_steps`
    log_every_n_steps: int = 10
    run_timer: bool = True  # the project's RunTimer callback (conf/callbacks/default.yaml)
    host_metrics: bool = True  # False: no per-batch metric updates or self.log in the module (ablation)


PROJECT_SETUP = TrainerSetup("project")


class _NoHostMetrics(XrayClassifier):
    """Ablation only: `XrayClassifier` without its per-batch host work (metric updates, train/loss and lr
    logging); epoch-end hooks just reset the metric states."""

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        pass

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_train_epoch_end(self) -> None:
        self.train_metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self.val_metrics.reset()


def make_module(cfg: BenchConfig, host_metrics: bool = True) -> XrayClassifier:
    """The project's module for `cfg` (random init, `compile=cfg.compile`)."""
    cls = XrayClassifier if host_metrics else _NoHostMetrics
    return seeded(
        cfg.seed,
        lambda: cls(
            backbone=cfg.backbone,
            weights="none",
            img_size=cfg.input_size,
            patch_size=cfg.patch_size,
            global_pool=cfg.global_pool,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            warmup_ratio=cfg.warmup_ratio,
            compile=cfg.compile,
        ),
    )


class BareLoop:
    """The reference loop (module doc); one model for every repeat, a fresh optimizer per training run."""

    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        model = seeded(
            cfg.seed,
            lambda: timm.create_model(
                cfg.backbone, pretrained=False, num_classes=NUM_LABELS, **cfg.timm_kwargs
            ),
        )
        self.model = model.to(cfg.device)
        if cfg.compile:
            self.model.compile()
        self.last_span: tuple[float, float] | None = None  # the last run's window, wall start and end

    def _autocast(self) -> Any:
        if self.cfg.precision == "bf16-mixed":
            return torch.autocast(self.cfg.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def train(self, batches: DeviceBatches) -> Window:
        cfg, model = self.cfg, self.model
        model.train()
        skip = tuple(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else ()
        groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        scheduler = warmup_cosine(optimizer, cfg.train_total, cfg.warmup_ratio)
        start = None
        for step, (images, labels) in enumerate(batches):
            with self._autocast():
                logits = model(images)
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if step == cfg.warmup_steps - 1:
                start = now(cfg.device)
        end = now(cfg.device)
        self.last_span = start[0], end[0]
        return window(cfg.steps * cfg.batch_size, start, end)

    def evaluate(self, batches: DeviceBatches) -> Window:
        cfg, model = self.cfg, self.model
        model.eval()
        start = None
        with torch.inference_mode():
            for step, (images, labels) in enumerate(batches):
                with self._autocast():
                    logits = model(images)
                F.binary_cross_entropy_with_logits(logits.float(), labels)
                if step == cfg.eval_warmup_steps - 1:
                    start = now(cfg.device)
        end = now(cfg.device)
        self.last_span = start[0], end[0]
        return window(cfg.eval_steps * cfg.eval_batch_size, start, end)


class _WindowClock(L.Callback):
    """Reads the clock at the end of batch `warmup - 1` and of batch `total - 1` of one loop run."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = warmup, total
        self.start: tuple[float, float] | None = None
        self.end: tuple[float, float] | None = None
        self.images = 0

    def _mark(self, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx >= self.warmup:
            self.images += len(batch[0])
        if batch_idx == self.warmup - 1:
            self.start = now(pl_module.device)
        elif batch_idx == self.total - 1:
            self.end = now(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self._mark(pl_module, batch, batch_idx)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):  # noqa: ANN001
        self._mark(pl_module, batch, batch_idx)

    def result(self, run_timer: RunTimer | None, key: str) -> Window:
        if self.start is None or self.end is None:
            raise RuntimeError(
                f"the loop ended before batch {self.total} (window not closed): too few batches of data"
            )
        timer_rate = run_timer.as_dict()["throughput"][key] if run_timer is not None else None
        self.span = self.start[0], self.end[0]
        return window(self.images, self.start, self.end, run_timer_images_per_s=timer_rate)


class LightningPath:
    """`XrayClassifier` (shared `module`) trained / validated by a fresh `lightning.Trainer` per call."""

    def __init__(self, cfg: BenchConfig, setup: TrainerSetup, module: XrayClassifier, workdir: Path) -> None:
        self.cfg, self.setup, self.module = cfg, setup, module
        self.workdir = Path(workdir)
        self._runs = 0
        self.last_span: tuple[float, float] | None = None  # the last run's window, wall start and end

    def _trainer(self, stage: str) -> tuple[L.Trainer, _WindowClock, RunTimer | None]:
        cfg, setup = self.cfg, self.setup
        warmup, total = (
            (cfg.warmup_steps, cfg.train_total) if stage == "fit" else (cfg.eval_warmup_steps, cfg.eval_total)
        )
        self._runs += 1
        clock = _WindowClock(warmup, total)
        timer = RunTimer(warmup_batches=warmup) if setup.run_timer else None
        logger = (
            CSVLogger(self.workdir, name=setup.name, version=f"{stage}_{self._runs}")
            if setup.csv_logger
            else False
        )
        trainer = L.Trainer(
            accelerator=cfg.accelerator,
            devices=1,
            precision=cfg.precision,
            max_epochs=1,
            max_steps=cfg.train_total if stage == "fit" else -1,
            limit_train_batches=cfg.train_total,
            limit_val_batches=0 if stage == "fit" else total,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=setup.progress_bar_refresh_rate > 0,
            log_every_n_steps=setup.log_every_n_steps,
            logger=logger,
            callbacks=[cb for cb in (timer, clock, self._progress_bar()) if cb is not None],
            default_root_dir=self.workdir,
        )
        return trainer, clock, timer

    def _progress_bar(self) -> TQDMProgressBar | None:
        rate = self.setup.progress_bar_refresh_rate
        return TQDMProgressBar(refresh_rate=rate) if rate > 0 else None

    def train(self, data: DeviceBatches | L.LightningDataModule) -> Window:
        trainer, clock, timer = self._trainer("fit")
        if isinstance(data, L.LightningDataModule):
            trainer.fit(self.module, datamodule=data)
        else:
            trainer.fit(self.module, train_dataloaders=data)
        result = clock.result(timer, "train_images_per_s")
        self.last_span = clock.span
        return result

    def evaluate(self, data: DeviceBatches | L.LightningDataModule) -> Window:
        trainer, clock, timer = self._trainer("validate")
        if isinstance(data, L.LightningDataModule):
            trainer.validate(self.module, datamodule=data, verbose=False)
        else:
            trainer.validate(self.module, dataloaders=data, verbose=False)
        result = clock.result(timer, "validate_images_per_s")
        self.last_span = clock.span
        return result
