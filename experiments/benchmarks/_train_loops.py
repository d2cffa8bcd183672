"""The measured loops of `train_throughput.py`: a bare timm loop and the project's Lightning path.

Each loop trains `warmup_steps + steps` optimizer steps (or evaluates `eval_warmup_steps + eval_steps`
batches) and returns a `Window`: images, wall and process CPU seconds from the end of the last warm-up batch
to the end of the last batch, the clock read (after `torch.cuda.synchronize` on a GPU) at those two ends only.

- `BareLoop`: `timm.create_model` (+ `nn.Module.compile`) with the config's model settings, AdamW over
  timm's weight-decay groups, the per-step warm-up cosine, `torch.autocast` for bf16-mixed, BCE in float32;
  fed `DeviceBatches` (float32 images already on the device and normalised, 0/1 labels [B, 15]).
- `LightningPath`: `XrayClassifier` from the config's `model`, a real `lightning.Trainer` with the config's
  callbacks (progress bar, RunTimer), logger and `log_every_n_steps`; checkpointing and the model summary
  off (they act at epoch end and fit start, outside the window), no validation inside `fit`. Fed the same
  `DeviceBatches` or an `NIHDataModule` (uint8 cache -> workers -> device -> `DeviceNormalize`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import timm
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from timm.optim import param_groups_weight_decay
from torch import Tensor

from xraycls.findings import NUM_LABELS
from xraycls.hardware.plan import resolve_precision
from xraycls.model.module import XrayClassifier
from xraycls.model.schedule import warmup_cosine
from xraycls.training.config import instantiate
from xraycls.training.timing import RunTimer

__all__ = ["Run", "Window", "DeviceBatches", "BareLoop", "LightningPath", "make_module"]

Batch = tuple[Tensor, Tensor]


class Run:
    """One composed project config (model, data, trainer, callbacks, logger, hardware) + the window sizes."""

    def __init__(
        self, cfg: DictConfig, eval_batch_size: int, warmup_steps: int, steps: int, eval_warmup_steps: int,
        eval_steps: int, seed: int = 0,
    ) -> None:  # fmt: skip
        self.cfg, self.eval_batch_size, self.seed = cfg, eval_batch_size, seed
        self.warmup_steps, self.steps = warmup_steps, steps  # training steps before / in the window
        self.eval_warmup_steps, self.eval_steps = eval_warmup_steps, eval_steps
        self.train_total, self.eval_total = warmup_steps + steps, eval_warmup_steps + eval_steps
        self.model: dict[str, Any] = OmegaConf.to_container(cfg.model, resolve=True)
        self.accelerator = cfg.hardware.accelerator
        self.precision = resolve_precision(cfg.hardware.precision, self.accelerator)
        self.device = torch.device("cuda", 0) if self.accelerator == "gpu" else torch.device("cpu")
        self.batch_size = int(cfg.data.batch_size)
        keys = ("img_size", "patch_size", "global_pool")
        self.timm_kwargs = {key: self.model[key] for key in keys if self.model.get(key) is not None}

    def with_steps(self, train: int, evaluate: int) -> Run:
        """The same run with one warm-up step and `train` / `evaluate` measured steps."""
        return Run(self.cfg, self.eval_batch_size, 1, train, 1, evaluate, self.seed)


@dataclasses.dataclass(frozen=True)
class Window:
    """Images and seconds after warm-up: wall time and this process's CPU time (not DataLoader workers');
    `run_timer_images_per_s` is the project's RunTimer reading of the same run."""

    images: int
    seconds: float
    cpu_seconds: float
    run_timer_images_per_s: float | None = None

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def cpu_images_per_s(self) -> float:
        return self.images / self.cpu_seconds


def _now(device: torch.device) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


def _window(images: int, start: tuple[float, float], end: tuple[float, float], **extra: Any) -> Window:
    return Window(images, end[0] - start[0], end[1] - start[1], **extra)


def _seeded(seed: int, build: Any) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class DeviceBatches:
    """`length` batches cycling over two on-device batches drawn from a local generator: images ~ N(0, 1)
    [B, 3, S, S] (what DeviceNormalize hands the model), labels 0/1 at ~10 % prevalence; sized."""

    def __init__(
        self, batch_size: int, input_size: int, device: torch.device, seed: int, length: int
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.batches = [
            (
                torch.randn(batch_size, 3, input_size, input_size, generator=generator).to(device),
                (torch.rand(batch_size, NUM_LABELS, generator=generator) < 0.1).float().to(device),
            )
            for _ in range(2)
        ]
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Batch]:
        return (self.batches[i % 2] for i in range(self.length))


class _NoHostMetrics(XrayClassifier):
    """Ablation only: no per-batch host work (metric updates, loss and lr logging); epoch ends just reset."""

    def on_train_batch_end(self, *args: Any) -> None:
        pass

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_train_epoch_end(self) -> None:
        self.train_metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self.val_metrics.reset()


def make_module(run: Run, host_metrics: bool = True) -> XrayClassifier:
    """The config's `XrayClassifier` (or the ablation's subclass), seeded."""
    if host_metrics:
        return _seeded(run.seed, lambda: instantiate(run.cfg.model))
    return _seeded(
        run.seed, lambda: _NoHostMetrics(**{k: v for k, v in run.model.items() if k != "_target_"})
    )


class BareLoop:
    """The reference loop (module doc); one model for every repeat, a fresh optimizer per training run."""

    def __init__(self, run: Run) -> None:
        self.run = run
        build = lambda: timm.create_model(  # noqa: E731
            run.model["backbone"], pretrained=False, num_classes=NUM_LABELS, **run.timm_kwargs
        )
        self.model = _seeded(run.seed, build).to(run.device)
        if run.model["compile"]:
            self.model.compile()
        self.last_span: tuple[float, float] | None = None  # the last window's wall start and end

    def _autocast(self) -> Any:
        bf16 = self.run.precision == "bf16-mixed"
        return torch.autocast(self.run.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def _loop(self, batches: DeviceBatches, warmup: int, step: Any) -> tuple[tuple[float, float], ...]:
        start = None
        for index, (images, labels) in enumerate(batches):
            with self._autocast():
                logits = self.model(images)
            step(F.binary_cross_entropy_with_logits(logits.float(), labels))
            if index == warmup - 1:
                start = _now(self.run.device)
        end = _now(self.run.device)
        self.last_span = start[0], end[0]
        return start, end

    def train(self, batches: DeviceBatches) -> Window:
        run, model = self.run, self.model.train()
        skip = tuple(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else ()
        groups = param_groups_weight_decay(model, run.model["weight_decay"], no_weight_decay_list=skip)
        optimizer = torch.optim.AdamW(groups, lr=run.model["lr"])
        scheduler = warmup_cosine(optimizer, run.train_total, run.model["warmup_ratio"])

        def step(loss: Tensor) -> None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()

        return _window(run.steps * run.batch_size, *self._loop(batches, run.warmup_steps, step))

    def evaluate(self, batches: DeviceBatches) -> Window:
        run = self.run
        self.model.eval()
        with torch.inference_mode():
            span = self._loop(batches, run.eval_warmup_steps, lambda loss: None)
        return _window(run.eval_steps * run.eval_batch_size, *span)


class _WindowClock(L.Callback):
    """Reads the clock at the end of batch `warmup - 1` and of batch `total - 1` of one loop run."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = warmup, total
        self.start = self.end = None
        self.images = 0

    def _mark(self, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.images += len(batch[0]) if batch_idx >= self.warmup else 0
        if batch_idx == self.warmup - 1:
            self.start = _now(pl_module.device)
        elif batch_idx == self.total - 1:
            self.end = _now(pl_module.device)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, _o: Any, batch: Any, i: int
    ):
        self._mark(pl_module, batch, i)

    def on_validation_batch_end(self, trainer, pl_module, _o, batch, i, dataloader_idx=0):  # noqa: ANN001
        self._mark(pl_module, batch, i)


class LightningPath:
    """`module` trained / validated by a fresh Trainer per call, configured by `cfg` (a composed config)."""

    def __init__(self, run: Run, cfg: DictConfig, name: str, module: XrayClassifier, workdir: Path) -> None:
        self.run, self.cfg, self.name, self.module, self.workdir = run, cfg, name, module, Path(workdir)
        self._runs = 0
        self.last_span: tuple[float, float] | None = None

    def _callbacks(self, warmup: int) -> list[L.Callback]:
        """The config's callbacks but the checkpoints; the progress bar only where the trainer enables it."""
        skip = {
            "model_checkpoint",
            "last_checkpoint",
            *(() if self.cfg.trainer.enable_progress_bar else ("progress_bar",)),
        }
        return [
            instantiate(node, **({"warmup_batches": warmup} if name == "run_timer" else {}))
            for name, node in (self.cfg.get("callbacks") or {}).items()
            if name not in skip and node is not None
        ]

    def _fit_or_validate(self, stage: str, data: Any) -> Window:
        run, cfg = self.run, self.cfg
        warmup, total = (
            (run.warmup_steps, run.train_total) if stage == "fit" else (run.eval_warmup_steps, run.eval_total)
        )
        self._runs += 1
        clock, callbacks = _WindowClock(warmup, total), self._callbacks(warmup)
        loggers = [
            instantiate(node, save_dir=str(self.workdir), name=self.name, version=f"{stage}_{self._runs}")
            for node in (cfg.get("logger") or {}).values()
        ]
        trainer = L.Trainer(
            accelerator=run.accelerator, devices=1, precision=run.precision, max_epochs=1,
            max_steps=run.train_total if stage == "fit" else -1, limit_train_batches=run.train_total,
            limit_val_batches=0 if stage == "fit" else total, num_sanity_val_steps=0,
            enable_checkpointing=False, enable_model_summary=False,
            enable_progress_bar=cfg.trainer.enable_progress_bar,
            log_every_n_steps=cfg.trainer.log_every_n_steps,
            logger=loggers or False, callbacks=[*callbacks, clock], default_root_dir=self.workdir,
        )  # fmt: skip
        key = "datamodule" if isinstance(data, L.LightningDataModule) else None
        if stage == "fit":
            trainer.fit(self.module, **{key or "train_dataloaders": data})
        else:
            trainer.validate(self.module, **{key or "dataloaders": data}, verbose=False)
        if clock.start is None or clock.end is None:
            raise RuntimeError(f"the loop ended before batch {total} (window not closed): too few batches")
        timers = [cb for cb in callbacks if isinstance(cb, RunTimer)]
        rate = (
            timers[0].as_dict()["throughput"][f"{'train' if stage == 'fit' else 'validate'}_images_per_s"]
            if timers
            else None
        )
        self.last_span = clock.start[0], clock.end[0]
        return _window(clock.images, clock.start, clock.end, run_timer_images_per_s=rate)

    def train(self, data: Any) -> Window:
        return self._fit_or_validate("fit", data)

    def evaluate(self, data: Any) -> Window:
        return self._fit_or_validate("validate", data)
