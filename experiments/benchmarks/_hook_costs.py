"""Where a step's time goes, in the bare loop and in the project's Lightning path, from instrumented runs.

`hook_costs()` wraps a fixed list of functions with a timer for the duration of one run: the work both
loops do (backbone forward, backward, the AdamW update, zero_grad, the lr scheduler step: `WORK_HOOKS`,
only without torch.compile, whose traced code a timer would break) and the project's host-side extras
(`HOOKS`: the module's batch hooks and the metric updates and `self.log` calls inside them, the progress
bar, the logger write, RunTimer). Each call's wall and CPU seconds are kept with its start time, so only
calls inside the measured window count (see `HookCosts.per_step`). What a step costs beyond the listed
parts is the loop itself: Lightning's machinery (closure, hook dispatch, batch transfer, result
collection) on one side, the bare loop's few lines (and the loss) on the other.

On a GPU the first hook that reads a device tensor also waits for the step's queued work to finish, so
its wall time there is mostly that wait, not host work.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import statistics
import time
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch
import torch.optim.lr_scheduler
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector

from xraycls.model.metrics import XrayMetrics
from xraycls.model.module import XrayClassifier
from xraycls.training.timing import RunTimer

__all__ = ["HOOKS", "work_hooks", "HookCosts", "hook_costs", "step_breakdown"]

Hook = tuple[str, Any, str]  # (label, owner: a class or a module, attribute); indented: called inside

HOOKS: tuple[Hook, ...] = (
    ("XrayClassifier.training_step (forward + loss)", XrayClassifier, "training_step"),
    ("XrayClassifier.validation_step (forward + loss)", XrayClassifier, "validation_step"),
    ("XrayClassifier.on_train_batch_start (reads the lr)", XrayClassifier, "on_train_batch_start"),
    (
        "XrayClassifier.on_train_batch_end (keeps outputs; logs on logger steps)",
        XrayClassifier,
        "on_train_batch_end",
    ),
    ("  LightningModule.log (train/loss, lr)", L.LightningModule, "log"),
    ("XrayClassifier.on_validation_batch_end (keeps outputs)", XrayClassifier, "on_validation_batch_end"),
    ("XrayMetrics.update (once per stage and epoch)", XrayMetrics, "update"),
    ("TQDMProgressBar.on_train_batch_end", TQDMProgressBar, "on_train_batch_end"),
    ("TQDMProgressBar.on_validation_batch_end", TQDMProgressBar, "on_validation_batch_end"),
    ("logger write (update_train_step_metrics)", _LoggerConnector, "update_train_step_metrics"),
    ("RunTimer.on_train_batch_end", RunTimer, "on_train_batch_end"),
    ("RunTimer.on_validation_batch_end", RunTimer, "on_validation_batch_end"),
)


def work_hooks(backbone_class: type) -> tuple[Hook, ...]:
    """The parts of a step that the bare loop and the Lightning path share, for `backbone_class`."""
    return (
        ("backbone forward", backbone_class, "forward"),
        ("backward", torch.Tensor, "backward"),
        # torch.optim deletes its submodule names; Adam.step calls this module-level function.
        ("AdamW update (torch.optim.adam.adam)", importlib.import_module("torch.optim.adam"), "adam"),
        ("optimizer.zero_grad", torch.optim.Optimizer, "zero_grad"),
        ("lr scheduler step", torch.optim.lr_scheduler.LRScheduler, "step"),
    )


class HookCosts:
    """Calls recorded as (label, start wall time, wall seconds, CPU seconds), in the order of `hooks`."""

    def __init__(self, hooks: Sequence[Hook]) -> None:
        self.labels = [label for label, _owner, _name in hooks]
        self.calls: list[tuple[str, float, float, float]] = []

    def per_step(self, start: float, end: float, steps: int) -> dict[str, dict[str, float]]:
        """{label: {"calls_per_step", "cpu_ms_per_step", "wall_ms_per_step", "wall_median_ms_per_call"}} over
        the calls started in [start, end). CPU time (summed, so periodic work such as the logger's write
        every n steps counts) is what the hook costs this process; wall time also holds time lost to other
        work on the machine and, on a GPU, waits for the device."""
        by_label: dict[str, list[tuple[float, float]]] = {}
        for label, began, wall, cpu in self.calls:
            if start <= began < end:
                by_label.setdefault(label, []).append((wall, cpu))
        result = {}
        for label in self.labels:
            if label not in by_label:
                continue
            walls, cpus = zip(*by_label[label], strict=True)
            result[label] = {
                "calls_per_step": round(len(walls) / steps, 2),
                "cpu_ms_per_step": round(sum(cpus) / steps * 1e3, 3),
                "wall_ms_per_step": round(sum(walls) / steps * 1e3, 3),
                "wall_median_ms_per_call": round(statistics.median(walls) * 1e3, 3),
            }
        return result


def _timed(label: str, original: Any, costs: HookCosts) -> Any:
    @functools.wraps(original)  # Lightning inspects some hooks' signatures
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            costs.calls.append((label, wall, time.perf_counter() - wall, time.process_time() - cpu))

    return wrapper


@contextlib.contextmanager
def hook_costs(hooks: Sequence[Hook] = HOOKS) -> Iterator[HookCosts]:
    """Times every function in `hooks` while the block runs; the owners are restored afterwards."""
    costs = HookCosts(hooks)
    saved = []
    try:
        for label, owner, name in hooks:
            original = owner.__dict__[name]  # the owner's own attribute, so restoring leaves no trace
            saved.append((owner, name, original))
            setattr(owner, name, _timed(label, original, costs))
        yield costs
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def step_breakdown(paths: dict, names: Sequence[str], data: Any, cfg: Any, rounds: int) -> dict:
    """{name: {"train"|"eval": {"step_cpu_ms", "step_ms", "work_cpu_ms", "overhead", "parts"}}}: medians
    over `rounds` instrumented runs per path and kind, in ms per step (see the module doc)."""
    hooks = HOOKS if cfg.compile else (*HOOKS, *work_hooks(type(paths["bare"].model)))
    work_labels = {label for label, _owner, _name in hooks[len(HOOKS) :]}
    runs: dict[tuple[str, str], list[dict]] = {}
    for round_index in range(rounds):
        order = [*names[round_index % len(names) :], *names[: round_index % len(names)]]
        for kind, steps in (("train", cfg.steps), ("eval", cfg.eval_steps)):
            for name in order:
                runner = paths[name]
                with hook_costs(hooks) as costs:
                    result = (runner.train if kind == "train" else runner.evaluate)(data(name, kind))
                parts = costs.per_step(*runner.last_span, steps)
                step_cpu = result.cpu_seconds / steps * 1e3
                work = sum(part["cpu_ms_per_step"] for label, part in parts.items() if label in work_labels)
                work = work or None  # compiled: the work is not instrumented
                runs.setdefault((name, kind), []).append(
                    {
                        "step_cpu_ms": step_cpu,
                        "step_ms": result.seconds / steps * 1e3,
                        "work_cpu_ms": work,
                        "overhead": step_cpu / work - 1 if work else None,
                        "parts": {label: part["cpu_ms_per_step"] for label, part in parts.items()},
                        "calls": {label: part["calls_per_step"] for label, part in parts.items()},
                    }
                )
    return {name: {kind: _medians(runs[name, kind]) for kind in ("train", "eval")} for name in names}


def _medians(runs: list[dict]) -> dict:
    def median(values: list) -> float | None:
        values = [value for value in values if value is not None]
        return round(statistics.median(values), 4) if values else None

    labels = dict.fromkeys(label for run in runs for label in run["parts"])
    return {
        **{
            key: median([run[key] for run in runs])
            for key in ("step_cpu_ms", "step_ms", "work_cpu_ms", "overhead")
        },
        "parts": {label: median([run["parts"].get(label) for run in runs]) for label in labels},
        "calls": {label: max(run["calls"].get(label, 0) for run in runs) for label in labels},
        "rounds": len(runs),
    }
