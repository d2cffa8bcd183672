"""Settings, clock and synthetic on-device batches shared by the paths of `train_throughput.py`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from xraycls.findings import NUM_LABELS

__all__ = ["BenchConfig", "Window", "now", "window", "make_device_batches", "DeviceBatches", "seeded"]

Batch = tuple[Tensor, Tensor]


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One model + hardware setting, shared by every path of a run."""

    backbone: str  # a timm name, e.g. test_vit or vit_base_patch16_224
    input_size: int  # model input side, px
    patch_size: int | None  # None: the backbone's own
    global_pool: str | None  # "token" | "avg"; None: the backbone's own
    batch_size: int  # training batch per step
    eval_batch_size: int
    precision: str  # Lightning's: "32-true" or "bf16-mixed"
    compile: bool  # nn.Module.compile of the backbone (XrayClassifier(compile=True) does the same)
    accelerator: str  # "cpu" or "gpu"
    warmup_steps: int  # training steps left out before the window
    steps: int  # training steps in the window
    eval_warmup_steps: int
    eval_steps: int
    lr: float = 2e-4
    weight_decay: float = 0.05
    warmup_ratio: float = 0.25
    seed: int = 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0) if self.accelerator == "gpu" else torch.device("cpu")

    @property
    def timm_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"img_size": self.input_size}
        if self.patch_size is not None:
            kwargs["patch_size"] = self.patch_size
        if self.global_pool is not None:
            kwargs["global_pool"] = self.global_pool
        return kwargs

    @property
    def train_total(self) -> int:
        return self.warmup_steps + self.steps

    @property
    def eval_total(self) -> int:
        return self.eval_warmup_steps + self.eval_steps


@dataclasses.dataclass(frozen=True)
class Window:
    """Images and seconds after warm-up: wall time, and this process's CPU time (all its threads, not
    DataLoader workers). `run_timer_images_per_s` is the project's RunTimer reading of the same run."""

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


def now(device: torch.device) -> tuple[float, float]:
    """(`time.perf_counter()`, `time.process_time()`), after waiting for the GPU's queued work when
    `device` is a CUDA device."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


def window(images: int, start: tuple[float, float], end: tuple[float, float], **extra: Any) -> Window:
    """The `Window` between two `now()` stamps."""
    return Window(images, end[0] - start[0], end[1] - start[1], **extra)


def make_device_batches(
    count: int, batch_size: int, input_size: int, device: torch.device, seed: int
) -> list[Batch]:
    """`count` distinct batches on `device`: images float32 [B, 3, S, S] ~ N(0, 1) (what DeviceNormalize
    hands the model), labels float32 [B, 15] of 0/1 at ~10 % prevalence. Drawn from a local generator."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        images = torch.randn(batch_size, 3, input_size, input_size, generator=generator)
        labels = (torch.rand(batch_size, NUM_LABELS, generator=generator) < 0.1).float()
        batches.append((images.to(device), labels.to(device)))
    return batches


class DeviceBatches:
    """`length` batches cycling over a few on-device batches; sized, so Lightning knows the epoch length."""

    def __init__(self, batches: Sequence[Batch], length: int) -> None:
        self.batches = list(batches)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Batch]:
        return (self.batches[i % len(self.batches)] for i in range(self.length))


def seeded(seed: int, build: Callable[[], Any]) -> Any:
    """`build()` under torch's CPU generator seeded with `seed`, leaving the caller's generator as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
