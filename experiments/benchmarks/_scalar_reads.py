"""Counting tensor -> Python value reads, the host-device synchronisations of a GPU run, on any device."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["ScalarReads"]


class ScalarReads(TorchDispatchMode):
    """Counts tensor -> Python value reads (`.item()`, `bool(t)`, `float(t)`, `torch.equal`).

    On a GPU a read of a device tensor is a host-device synchronisation that stalls the launch queue;
    counting them on the CPU (eager only, not under torch.compile) shows how many a path would make per
    step. `by_caller` files each read under the code that made it: the top-level package of the first
    frame outside torch (lightning, torchmetrics, xraycls, ...), or "torch.optim" for the optimizer's
    step counters, which live on the CPU even in a GPU run (no sync there).
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_caller: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        # Under inference_mode `bool(t)` reaches the mode as is_nonzero, elsewhere as _local_scalar_dense.
        if func in _SCALAR_READS:
            caller = _caller()
            self.by_caller[caller] = self.by_caller.get(caller, 0) + 1
        return func(*args, **(kwargs or {}))


_SCALAR_READS = (
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.item.default,
    torch.ops.aten.equal.default,
)
_TORCH_DIR = str(Path(torch.__file__).parent) + "/"


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_TORCH_DIR + "optim/"):
            return "torch.optim"
        if not filename.startswith(_TORCH_DIR) and filename != __file__:
            if "site-packages/" in filename:
                return filename.split("site-packages/", 1)[1].split("/", 1)[0]
            if "/xraycls/" in filename:
                return "xraycls"
            return Path(filename).name
        frame = frame.f_back
    return "torch"
