"""Instruments of `train_throughput.py`: where a step's time goes, tensor -> Python reads, model FLOPs.

- `step_breakdown`: each hook timed (wall and CPU) for one instrumented run; only calls inside the window
  count. Host hooks are found, not listed: every `*_step` and `*_batch_*` method the module's class and
  the run's callback classes define, `LightningModule.log`, `XrayMetrics.update` and Lightning's logger
  write. Work hooks (both loops: backbone forward, backward, AdamW update, zero_grad, lr scheduler step) only
  without torch.compile, whose traced code a timer would break. overhead = step CPU / work CPU - 1.
  On a GPU the first hook that reads a device tensor also waits for the queued work (its wall time).
- `ScalarReads`: `.item()`, `bool(t)`, `float(t)`, `torch.equal`, by the package that made them (on a
  GPU each is a host-device sync; torch.optim's step counters live on the CPU, no sync there).
- `count_flops`: FLOPs per image (a multiply-add = 2) from `FlopCounterMode` on the meta device, forward and
  forward + backward; `vit_formula_flops` the textbook ViT count as a cross-check (ViT-B/16 at 224: 35.1
  GFLOPs forward, 105.4 train; the counter 35.1 / 105.1). MFU uses dense bf16/fp16 datasheet peaks only.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import timm
import torch
import torch.optim.lr_scheduler
from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from xraycls.model.metrics import XrayMetrics

__all__ = ["ScalarReads", "step_breakdown", "count_flops", "vit_formula_flops", "peak_tflops", "mfu"]

Hook = tuple[str, Any, str]  # (label, owner: a class or a module, attribute)


def host_hooks(classes: Sequence[type]) -> list[Hook]:
    """The per-batch host work of `classes` (the module's and the callbacks'), found by name."""
    found = [
        (f"{cls.__name__}.{name}", cls, name)
        for cls in classes
        for name, value in vars(cls).items()
        if callable(value) and not name.startswith("_") and (name.endswith("_step") or "_batch_" in name)
    ]
    return [
        *found,
        ("LightningModule.log", L.LightningModule, "log"),
        ("XrayMetrics.update (once per stage and epoch)", XrayMetrics, "update"),
        ("logger write (update_train_step_metrics)", _LoggerConnector, "update_train_step_metrics"),
    ]


def work_hooks(backbone_class: type) -> list[Hook]:
    return [
        ("backbone forward", backbone_class, "forward"),
        ("backward", torch.Tensor, "backward"),
        # torch.optim deletes its submodule names; Adam.step calls this module-level function.
        ("AdamW update (torch.optim.adam.adam)", importlib.import_module("torch.optim.adam"), "adam"),
        ("optimizer.zero_grad", torch.optim.Optimizer, "zero_grad"),
        ("lr scheduler step", torch.optim.lr_scheduler.LRScheduler, "step"),
    ]


@contextlib.contextmanager
def _timed(hooks: Sequence[Hook]) -> Iterator[list[tuple[str, float, float, float]]]:
    """Records (label, start, wall s, CPU s) per call of each hook while the block runs; restores them."""
    calls: list[tuple[str, float, float, float]] = []

    def wrap(label: str, original: Any) -> Any:
        @functools.wraps(original)  # Lightning inspects some hooks' signatures
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                calls.append((label, wall, time.perf_counter() - wall, time.process_time() - cpu))

        return wrapper

    saved = [(owner, name, owner.__dict__[name]) for _label, owner, name in hooks]
    try:
        for (label, owner, name), (_o, _n, original) in zip(hooks, saved, strict=True):
            setattr(owner, name, wrap(label, original))
        yield calls
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def _median(values: list) -> float | None:
    values = [value for value in values if value is not None]
    return round(statistics.median(values), 4) if values else None


def step_breakdown(
    paths: dict, names: Sequence[str], data: Any, run: Any, rounds: int, classes: list[type]
) -> dict:
    """{name: {"train"|"eval": {"step_cpu_ms", "step_ms", "work_cpu_ms", "overhead", "parts", "calls"}}}:
    medians over `rounds` instrumented runs, ms per step (module doc)."""
    work = [] if run.model["compile"] else work_hooks(type(paths["bare"].model))
    hooks = [*host_hooks(classes), *work]
    work_labels = {label for label, _owner, _name in work}
    runs: dict[tuple[str, str], list[dict]] = {}
    for index in range(rounds):
        order = [*names[index % len(names) :], *names[: index % len(names)]]
        for kind, steps in (("train", run.steps), ("eval", run.eval_steps)):
            for name in order:
                runner = paths[name]
                with _timed(hooks) as calls:
                    result = (runner.train if kind == "train" else runner.evaluate)(data(name, kind))
                start, end = runner.last_span
                parts: dict[str, list[float]] = {}
                for label, began, _wall, cpu in calls:
                    if start <= began < end:
                        parts.setdefault(label, []).append(cpu)
                step_cpu = result.cpu_seconds / steps * 1e3
                work_ms = sum(sum(parts[label]) for label in parts if label in work_labels) / steps * 1e3
                runs.setdefault((name, kind), []).append({
                    "step_cpu_ms": step_cpu,
                    "step_ms": result.seconds / steps * 1e3,
                    "work_cpu_ms": work_ms or None,  # compiled: the work is not instrumented
                    "overhead": step_cpu / work_ms - 1 if work_ms else None,
                    "parts": {label: sum(cpus) / steps * 1e3 for label, cpus in parts.items()},
                    "calls": {label: round(len(cpus) / steps, 2) for label, cpus in parts.items()},
                })  # fmt: skip
    result = {}
    for (name, kind), items in runs.items():
        labels = dict.fromkeys(label for item in items for label in item["parts"])
        result.setdefault(name, {})[kind] = {
            **{
                key: _median([item[key] for item in items])
                for key in ("step_cpu_ms", "step_ms", "work_cpu_ms", "overhead")
            },
            "parts": {label: _median([item["parts"].get(label) for item in items]) for label in labels},
            "calls": {label: max(item["calls"].get(label, 0) for item in items) for label in labels},
            "rounds": len(items),
        }
    return result


_SCALAR_READS = (
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,  # bool(t) under inference_mode
    torch.ops.aten.item.default,
    torch.ops.aten.equal.default,
)
_TORCH_DIR = str(Path(torch.__file__).parent) + "/"


class ScalarReads(TorchDispatchMode):
    """Counts tensor -> Python value reads by caller (eager only, not under torch.compile)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_caller: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func in _SCALAR_READS:
            caller = _caller()
            self.by_caller[caller] = self.by_caller.get(caller, 0) + 1
        return func(*args, **(kwargs or {}))


def _caller() -> str:
    """The top-level package of the first frame outside torch; "torch.optim" for the optimizer's counters."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_TORCH_DIR + "optim/"):
            return "torch.optim"
        if not filename.startswith(_TORCH_DIR) and filename != __file__:
            if "site-packages/" in filename:
                return filename.split("site-packages/", 1)[1].split("/", 1)[0]
            return "xraycls" if "/xraycls/" in filename else Path(filename).name
        frame = frame.f_back
    return "torch"


# (substring of torch.cuda.get_device_name(), dense bf16/fp16 tensor TFLOP/s); first match wins.
PEAK_TFLOPS = (
    ("H200", 989.4),
    ("H100 80GB HBM3", 989.4),
    ("H100 SXM", 989.4),
    ("H100 PCIe", 756.0),
    ("A100", 312.0),
)


def _meta_model(backbone: str, timm_kwargs: dict[str, Any]) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(backbone, pretrained=False, num_classes=15, **timm_kwargs)


def count_flops(backbone: str, timm_kwargs: dict[str, Any], input_size: int) -> dict[str, float]:
    model = _meta_model(backbone, timm_kwargs)
    images = torch.zeros(1, 3, input_size, input_size, device="meta")
    with FlopCounterMode(display=False) as forward:
        model(images)
    with FlopCounterMode(display=False) as train:
        model(images).float().sum().backward()
    return {"forward": float(forward.get_total_flops()), "train": float(train.get_total_flops())}


def vit_formula_flops(backbone: str, timm_kwargs: dict[str, Any]) -> dict[str, float] | None:
    """Patch embedding + per block (qkv, scores, scores x values, projection, MLP) + head; train 3x."""
    model = _meta_model(backbone, timm_kwargs)
    names = ("blocks", "patch_embed", "embed_dim", "num_prefix_tokens")
    if not all(hasattr(model, n) for n in names) or not hasattr(model.patch_embed, "num_patches"):
        return None
    dim, depth, patches = int(model.embed_dim), len(model.blocks), int(model.patch_embed.num_patches)
    tokens, mlp = patches + int(model.num_prefix_tokens), int(model.blocks[0].mlp.fc1.out_features)
    per_block = (
        6 * tokens * dim * dim + 4 * tokens * tokens * dim + 2 * tokens * dim * dim + 4 * tokens * dim * mlp
    )
    forward = 2 * patches * int(model.patch_embed.proj.weight[0].numel()) * dim + depth * per_block + 30 * dim
    return {"forward": float(forward), "train": float(3 * forward)}


def peak_tflops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(dense peak TFLOP/s or None, the device's name); None on the CPU, in fp32 or on an unlisted card."""
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    half = precision in ("bf16-mixed", "16-mixed", "bf16-true", "16-true")
    return next((peak for fragment, peak in PEAK_TFLOPS if fragment in name and half), None), name


def mfu(images_per_s: float | None, flops_per_image: float, peak: float | None) -> float | None:
    return None if peak is None or images_per_s is None else images_per_s * flops_per_image / (peak * 1e12)
