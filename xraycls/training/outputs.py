"""A stage's predictions over every rank: what the thresholds (val) and the ROC plot (test) are made from."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch

from xraycls.findings import LABELS
from xraycls.model.module import XrayClassifier

__all__ = ["gathered_outputs"]


def gathered_outputs(
    trainer: L.Trainer, model: XrayClassifier, stage: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """Every rank's probabilities and labels of the last `stage` ("val", "test") pass, float32 [N, 15] each.

    A collective with several processes: call it on every rank. Each image is seen once (the DataModule's
    eval loaders are unpadded under DDP), so the gathered rows are the whole split.
    """
    local = model.eval_outputs(stage)
    if trainer.world_size == 1:
        return local
    width = len(LABELS)
    rows = np.zeros((0, 2 * width), np.float32) if local is None else np.concatenate(local, axis=1)
    # all_gather needs one shape on every rank: pad to the largest count, then cut each rank's part back.
    counts = trainer.strategy.all_gather(torch.tensor([len(rows)], device=model.device)).reshape(-1)
    padded = torch.zeros((int(counts.max()), 2 * width), device=model.device)
    padded[: len(rows)] = torch.from_numpy(rows).to(model.device)
    gathered = trainer.strategy.all_gather(padded)
    everything = torch.cat([part[: int(n)] for part, n in zip(gathered, counts, strict=True)]).cpu().numpy()
    if not len(everything):
        return None
    return everything[:, :width], everything[:, width:]
