"""The measured loops of `train_throughput.py`: a bare PyTorch loop and the project's Lightning loop.

Both are called as `loop(kind, data) -> Window`, kind "train" (optimizer steps) or "eval" (no gradients),
and clocked (after `torch.cuda.synchronize` on a GPU) at the end of the last warm-up batch and of the last.

- `BareLoop`: the config's backbone (compiled when the config says so), AdamW over the module's parameter
  groups with its per-step warm-up cosine, `torch.autocast` for bf16-mixed, BCE in float32; fed
  `DeviceBatches` (images already on the device and normalised, 0/1 labels).
- `LightningLoop`: the config's `XrayClassifier` and a Trainer built, as a run builds it, from the config's
  trainer, hardware, callbacks and logger; checkpoints and the model summary off (they act at epoch end
  and fit start, outside the window), no validation inside `fit`. Fed `DeviceBatches` or a DataModule.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from xraycls.findings import NUM_LABELS
from xraycls.model.backbone import param_groups
from xraycls.model.module import XrayClassifier
from xraycls.model.schedule import warmup_cosine
from xraycls.training.config import hardware_arguments, hardware_plan, instantiate
from xraycls.training.timing import RunTimer

__all__ = ["Run", "Window", "DeviceBatches", "BareLoop", "LightningLoop", "make_module"]


@dataclasses.dataclass
class Run:
    """A composed project config and the size of each loop run: `warmup` batches, then measured to `total`."""

    cfg: DictConfig
    warmup: int
    total: int
    seed: int = 0

    def __post_init__(self) -> None:
        self.hardware = hardware_arguments(self.cfg, hardware_plan(self.cfg))  # accelerator, precision, ...
        self.device = torch.device("cuda" if self.hardware["accelerator"] == "gpu" else "cpu")


@dataclasses.dataclass(frozen=True)
class Window:
    """After warm-up: images, batches, the wall clock at the start, wall and this process's CPU seconds
    (not DataLoader workers'), and the project's RunTimer reading of the same run where it ran."""

    images: int
    batches: int
    start: float
    seconds: float
    cpu_seconds: float
    run_timer_images_per_s: float | None = None

    def holds(self, moment: float) -> bool:
        return self.start <= moment < self.start + self.seconds


class Clock(L.Callback):
    """Reads the wall and CPU clocks at the end of batch `warmup - 1` and of batch `total - 1`."""

    def __init__(self, device: torch.device, warmup: int, total: int) -> None:
        self.device, self.warmup, self.total = device, warmup, total
        self.marks: list[tuple[float, float]] = []
        self.images = self.batches = 0

    def mark(self, index: int, images: int) -> None:
        if index >= self.warmup:
            self.images, self.batches = self.images + images, self.batches + 1
        if index in (self.warmup - 1, self.total - 1):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.marks.append((time.perf_counter(), time.process_time()))

    def on_train_batch_end(self, trainer, module, outputs, batch, index) -> None:  # noqa: ANN001
        self.mark(index, len(batch[0]))

    def on_validation_batch_end(self, trainer, module, outputs, batch, index, loader=0) -> None:  # noqa: ANN001
        self.mark(index, len(batch[0]))

    def window(self, run_timer_images_per_s: float | None = None) -> Window:
        if len(self.marks) != 2:
            raise RuntimeError(f"the loop ended before batch {self.total}: too few batches for the window")
        (wall0, cpu0), (wall1, cpu1) = self.marks
        return Window(self.images, self.batches, wall0, wall1 - wall0, cpu1 - cpu0, run_timer_images_per_s)


class DeviceBatches:
    """`run.total` batches of the config's size cycling over two on the device: images ~ N(0, 1) (what
    DeviceNormalize hands the model), labels 0/1 at ~10 % prevalence. Not a list: Lightning would take
    that for several loaders."""

    def __init__(self, run: Run) -> None:
        generator = torch.Generator().manual_seed(run.seed)
        batch, size = int(run.cfg.data.batch_size), int(run.cfg.data.input_size)
        pairs = [
            (torch.randn(batch, 3, size, size, generator=generator).to(run.device),
             (torch.rand(batch, NUM_LABELS, generator=generator) < 0.1).float().to(run.device))
            for _ in range(2)
        ]  # fmt: skip
        self.batches = [pairs[i % 2] for i in range(run.total)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _NoHostMetrics(XrayClassifier):
    """Ablation only: none of the module's per-batch host work (kept outputs, loss and lr logging), hence
    no epoch metrics either."""

    def _skip(self, *args: Any, **kwargs: Any) -> None:
        pass

    on_train_batch_end = on_validation_batch_end = on_train_epoch_end = on_validation_epoch_end = _skip


def make_module(run: Run, host_metrics: bool = True) -> XrayClassifier:
    """The config's `XrayClassifier` (or the ablation's subclass), seeded."""
    torch.manual_seed(run.seed)
    if host_metrics:
        return instantiate(run.cfg.model)
    settings = OmegaConf.to_container(run.cfg.model, resolve=True)
    return _NoHostMetrics(**{key: value for key, value in settings.items() if key != "_target_"})


class BareLoop:
    """The reference loop (module doc); one model for every call, a fresh optimizer per training run."""

    def __init__(self, run: Run) -> None:
        module = make_module(run)
        self.run, self.model, self.hp = run, module.backbone.to(run.device), module.hparams

    def __call__(self, kind: str, batches: DeviceBatches) -> Window:
        run, model, hp, train = self.run, self.model, self.hp, kind == "train"
        model.train(train)
        if train:
            groups = param_groups(model, hp.lr, hp.weight_decay, hp.layer_decay)
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
            scheduler = warmup_cosine(optimizer, len(batches), hp.warmup_ratio, hp.min_lr_ratio)
        bf16 = run.hardware["precision"] == "bf16-mixed"
        autocast = torch.autocast(run.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        clock = Clock(run.device, run.warmup, run.total)
        with torch.inference_mode(not train):
            for index, (images, labels) in enumerate(batches):
                with autocast:
                    logits = model(images)
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels)
                if train:
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                clock.mark(index, len(images))
        return clock.window()


class LightningLoop:
    """`module` trained or validated by a fresh Trainer per call, built from `cfg` (module doc)."""

    def __init__(self, run: Run, cfg: DictConfig, name: str, module: XrayClassifier, workdir: Path) -> None:
        self.run, self.cfg, self.name, self.module, self.workdir = run, cfg, name, module, str(workdir)
        self.calls = 0

    def callbacks(self, warmup: int) -> list[L.Callback]:
        """The config's callbacks but the checkpoints; the progress bar only where the trainer enables it."""
        skip = {"model_checkpoint", "last_checkpoint"}
        if not self.cfg.trainer.enable_progress_bar:
            skip.add("progress_bar")
        return [
            instantiate(node, **({"warmup_batches": warmup} if name == "run_timer" else {}))
            for name, node in (self.cfg.get("callbacks") or {}).items()
            if name not in skip and node is not None
        ]

    def __call__(self, kind: str, data: Any) -> Window:
        run, total, train = self.run, self.run.total, kind == "train"
        self.calls += 1
        clock, callbacks = Clock(run.device, run.warmup, total), self.callbacks(run.warmup)
        loggers = [
            instantiate(node, save_dir=self.workdir, name=self.name, version=f"{kind}_{self.calls}")
            for node in (self.cfg.get("logger") or {}).values()
        ]
        trainer_cfg = OmegaConf.to_container(self.cfg.trainer, resolve=True)
        trainer: L.Trainer = instantiate(  # as a run builds it: the hardware's arguments as objects
            {key: value for key, value in trainer_cfg.items() if key not in run.hardware}, **run.hardware,
            max_epochs=1, max_steps=total if train else -1, limit_train_batches=total,
            limit_val_batches=0 if train else total, num_sanity_val_steps=0, enable_checkpointing=False,
            enable_model_summary=False, default_root_dir=self.workdir, logger=loggers or False,
            callbacks=[*callbacks, clock],
        )  # fmt: skip
        if train:  # data: batches or a DataModule
            trainer.fit(self.module, data)
        else:
            trainer.validate(self.module, data, verbose=False)
        timers = [callback for callback in callbacks if isinstance(callback, RunTimer)]
        key = "train_images_per_s" if train else "validate_images_per_s"
        return clock.window(timers[0].as_dict()["throughput"][key] if timers else None)
