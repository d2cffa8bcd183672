"""Evaluation metrics over a whole stage: per-label AUROC, the macro means, the guide's AUROC and the loss.

AUROC is computed once over every image of the stage (torchmetrics gathers the predictions of all DDP
ranks before computing), never as a mean of per-batch or per-rank AUROCs.

- ``auroc_per_finding``: {label: AUROC of the logits} for all 15 `LABELS` (the 14 findings and No Finding).
- ``auroc_macro14``: mean over the 14 findings, the number the literature reports.
- ``auroc_macro15``: mean over all 15 labels.
- ``auroc_seed_compat``: the guide's number. It applied a softmax across the 15 logits and called
  ``sklearn.metrics.roc_auc_score(labels, softmax, multi_class="ovo")``; on a multi-label indicator matrix
  sklearn ignores ``multi_class`` and returns the macro mean of the per-column AUROCs of those softmax
  scores. Reproduced here exactly that way.
- ``loss``: mean of the per-batch losses, weighted by batch size.

A label without both positives and negatives in the stage has no AUROC: it is NaN in
``auroc_per_finding`` and left out of every macro mean, with a logged warning naming it.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MultilabelAUROC

from xraycls.findings import FINDINGS, LABELS

__all__ = ["XrayMetrics"]

log = logging.getLogger(__name__)


class XrayMetrics(nn.Module):
    """Accumulates one stage's logits and labels; `compute()` gives the dict described in the module doc.

    `update` takes logits [B, L] (any float dtype) and labels [B, L] of 0/1 in `label_names` order
    (default `LABELS`, L = 15). As an `nn.Module` child of the LightningModule its states move with the
    model to the device.
    """

    def __init__(self, label_names: Sequence[str] = LABELS, stage: str = "eval") -> None:
        super().__init__()
        self.label_names = tuple(label_names)
        self.stage = stage
        num_labels = len(self.label_names)
        self._findings = [i for i, name in enumerate(self.label_names) if name in FINDINGS]
        self.auroc = MultilabelAUROC(num_labels=num_labels, average=None, thresholds=None)
        self.auroc_softmax = MultilabelAUROC(num_labels=num_labels, average=None, thresholds=None)
        self.counts = _LabelCounts(num_labels)
        self.loss = MeanMetric()

    @torch.no_grad()
    def update(self, logits: Tensor, labels: Tensor, loss: Tensor | None = None) -> None:
        if logits.shape != labels.shape or logits.ndim != 2 or logits.shape[1] != len(self.label_names):
            raise ValueError(
                f"{self.stage} metrics: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must "
                f"both be [batch, {len(self.label_names)}]"
            )
        logits = logits.detach().float()
        target = (labels.detach() > 0.5).long()
        self.auroc.update(logits, target)
        self.auroc_softmax.update(torch.softmax(logits, dim=1), target)
        self.counts.update(target)
        if loss is not None:
            self.loss.update(loss.detach().float(), weight=logits.shape[0])

    def compute(self) -> dict[str, float | dict[str, float]]:
        """{"loss", "auroc_macro14", "auroc_macro15", "auroc_seed_compat", "auroc_per_finding"}; floats.

        ``loss`` is NaN when `update` never got one; everything is NaN before the first `update`.
        """
        if self.counts.update_count == 0:
            log.warning("%s metrics: computed before any update; every value is NaN", self.stage)
            nan_labels = dict.fromkeys(self.label_names, math.nan)
            names = ("loss", "auroc_macro14", "auroc_macro15", "auroc_seed_compat")
            return {**dict.fromkeys(names, math.nan), "auroc_per_finding": nan_labels}
        positives, negatives = self.counts.compute()
        defined = (positives > 0) & (negatives > 0)
        undefined = [name for name, ok in zip(self.label_names, defined.tolist(), strict=True) if not ok]
        if undefined:
            log.warning(
                "%s metrics: no AUROC for %s (only one class present among the %d images); "
                "reported as NaN and left out of the macro means",
                self.stage,
                undefined,
                int(positives[0] + negatives[0]),
            )
        with warnings.catch_warnings():
            # torchmetrics warns and returns 0 for a one-class label; those are masked to NaN just below.
            warnings.filterwarnings("ignore", message="No (positive|negative) samples in targets")
            per_label = _masked(self.auroc.compute(), defined)
            per_label_softmax = _masked(self.auroc_softmax.compute(), defined)
        has_loss = self.loss.update_count > 0
        return {
            "loss": float(self.loss.compute()) if has_loss else math.nan,
            "auroc_macro14": _nanmean(per_label[self._findings]),
            "auroc_macro15": _nanmean(per_label),
            "auroc_seed_compat": _nanmean(per_label_softmax),
            "auroc_per_finding": dict(zip(self.label_names, per_label.tolist(), strict=True)),
        }

    def reset(self) -> None:
        for metric in (self.auroc, self.auroc_softmax, self.counts, self.loss):
            metric.reset()


class _LabelCounts(Metric):
    """Positives and negatives per label over the stage (summed across DDP ranks)."""

    full_state_update = False

    def __init__(self, num_labels: int) -> None:
        super().__init__()
        self.add_state("positives", torch.zeros(num_labels, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("negatives", torch.zeros(num_labels, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, target: Tensor) -> None:
        self.positives += target.sum(dim=0)
        self.negatives += (1 - target).sum(dim=0)

    def compute(self) -> tuple[Tensor, Tensor]:
        return self.positives, self.negatives


def _masked(values: Tensor, defined: Tensor) -> Tensor:
    values = values.detach().double().cpu()
    return torch.where(defined.cpu(), values, torch.full_like(values, math.nan))


def _nanmean(values: Tensor) -> float:
    # An all-NaN input gives NaN (torch.nanmean does too), the honest answer when nothing is defined.
    return float(torch.nanmean(values)) if values.numel() else math.nan
