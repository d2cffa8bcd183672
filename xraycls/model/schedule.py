"""Learning-rate schedule: linear warm-up from 0, then cosine decay, stepped once per optimizer step.

The guide (Hugging Face `TrainingArguments` with `lr_scheduler_type="cosine"`, `warmup_ratio=0.25`) used the
same shape: warm-up steps = ceil(total_steps * warmup_ratio), the factor is step / warmup_steps during the
warm-up (so the very first optimizer step runs at lr 0), then half a cosine down to `min_lr_ratio`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["warmup_cosine", "warmup_cosine_factor"]


def warmup_cosine_factor(
    total_steps: int, warmup_ratio: float = 0.25, min_lr_ratio: float = 0.0
) -> Callable[[int], float]:
    """The multiplier of the peak lr at each optimizer step (0-based): 0 -> 1 -> `min_lr_ratio`.

    Past `total_steps` the factor stays at `min_lr_ratio` (Lightning may step once more than estimated).
    """
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int (optimizer steps), got {total_steps!r}")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio!r}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
    warmup_steps = math.ceil(total_steps * warmup_ratio)
    decay_steps = max(1, total_steps - warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_ratio: float = 0.25, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """A `LambdaLR` over every parameter group of `optimizer` (each keeps its own peak lr, e.g. layer decay).

    Step it once per optimizer step (Lightning: `interval="step"`), not per batch: with gradient
    accumulation `total_steps` is the number of optimizer steps (`trainer.estimated_stepping_batches`).
    """
    return LambdaLR(optimizer, warmup_cosine_factor(total_steps, warmup_ratio, min_lr_ratio))
