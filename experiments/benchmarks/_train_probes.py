"""Instruments of `train_throughput.py` (eager only: a timer or a dispatch mode cannot watch compiled code).

`probe` runs a loop twice more: once under `timed_work`, once under `ScalarReads`.

- `timed_work`: the CPU time of the work both loops share (backbone forward, backward, the AdamW update,
  zero_grad, the lr scheduler step), per call, so that a step's overhead = step CPU / work CPU - 1.
- `ScalarReads`: `.item()`, `bool(t)`, `float(t)`, `torch.equal`, by the package that made them (on a GPU
  each is a host-device sync; torch.optim's step counters live on the CPU, no sync there).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch.optim.lr_scheduler import LRScheduler
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["probe", "timed_work", "ScalarReads"]


@contextlib.contextmanager
def timed_work(backbone_class: type) -> Iterator[list[tuple[float, float]]]:
    """(wall start, CPU seconds) of each call of the shared work while the block runs (module doc)."""
    calls: list[tuple[float, float]] = []

    def timed(original: Any) -> Any:
        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                calls.append((wall, time.process_time() - cpu))

        return wrapper

    # torch.optim deletes its submodule names; Adam.step calls this module-level function.
    adam = importlib.import_module("torch.optim.adam")
    hooks = ((backbone_class, "forward"), (torch.Tensor, "backward"), (adam, "adam"),
             (torch.optim.Optimizer, "zero_grad"), (LRScheduler, "step"))  # fmt: skip
    with contextlib.ExitStack() as stack:
        for owner, name in hooks:
            stack.enter_context(mock.patch.object(owner, name, timed(getattr(owner, name))))
        yield calls


_SCALAR_READS = (
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,  # bool(t) under inference_mode
    torch.ops.aten.item.default,
    torch.ops.aten.equal.default,
)
_TORCH_DIR = str(Path(torch.__file__).parent) + "/"


class ScalarReads(TorchDispatchMode):
    """(wall time, caller) of every tensor -> Python value read while active."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[float, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func in _SCALAR_READS:
            self.reads.append((time.perf_counter(), _caller()))
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


def probe(loop: Callable[[str, Any], Any], kind: str, data: Any, backbone_class: type) -> dict:
    """{"overhead": step CPU / work CPU - 1, "reads": {caller: reads per step}}, in the loop's window."""
    with timed_work(backbone_class) as calls:
        window = loop(kind, data)
    work = sum(cpu for began, cpu in calls if window.holds(began))
    overhead = round(window.cpu_seconds / work - 1, 4) if work else None
    with ScalarReads() as reads:
        window = loop(kind, data)
    counts = Counter(caller for moment, caller in reads.reads if window.holds(moment))
    return {
        "overhead": overhead,
        "reads": {k: round(v / window.batches, 2) for k, v in sorted(counts.items())},
    }
