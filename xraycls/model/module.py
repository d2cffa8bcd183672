"""The LightningModule: a timm ViT with a 15-way multi-label head, trained with BCE-with-logits.

Batches are ``(images, labels)``: images float32 [B, 3, H, W], already normalised on the device by the
DataModule; labels float32 [B, 15] of 0/1 in `xraycls.findings.LABELS` order.

The steps only compute: they return tensors and never log or touch a metric, so the same module runs
under the IPU strategy (the step is traced and run on the IPU) and under `torch.compile`. The
``on_*_batch_end`` hooks only keep each batch's detached logits and labels, on the device; the metrics are
updated once per stage, in the ``on_*_epoch_end`` hooks. So no batch waits for the device: a per-batch
metric update or progress-bar value costs a device-to-host read, which drains a GPU's queue every step.
Logged keys, with ``<stage>`` in train, val, test:

- on the training steps the logger writes (every ``trainer.log_every_n_steps``): ``train/loss`` (that
  batch's) and ``lr`` (the lr it trained at; with layer decay the head's, the highest);
- per epoch: ``<stage>/auroc_macro14``, ``<stage>/auroc_macro15``, ``<stage>/auroc_seed_compat``,
  ``<stage>/auroc/<label>``, and ``val/loss``, ``test/loss``, ``train/loss_epoch``; the progress bar
  shows ``val/loss`` and ``val/auroc_macro14``.

The last val and test results stay in `last_metrics` (the dict of `XrayMetrics.compute`) for the run's
summary.json.

NOTE: `load_from_checkpoint` rebuilds the module from its saved hyperparameters, including ``weights``;
pass ``weights="none"`` to skip fetching pretrained weights that the checkpoint overwrites anyway.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from xraycls.findings import LABELS, NUM_LABELS
from xraycls.model.backbone import DEFAULT_BACKBONE, create_backbone, param_groups
from xraycls.model.checkpoint import open_checkpoint
from xraycls.model.metrics import XrayMetrics
from xraycls.model.schedule import warmup_cosine, warmup_cosine_factor

__all__ = ["XrayClassifier", "check_optim_settings", "pos_weight_from_prevalence"]


def pos_weight_from_prevalence(prevalence: Tensor, max_weight: float = 100.0) -> list[float]:
    """BCE ``pos_weight`` per label: negatives / positives = (1 - p) / p, clipped to [1/max, max].

    `prevalence` [L] is the fraction of positive training images per label (in [0, 1]); a label with
    no positives gets `max_weight` (NIH Hernia, at 0.2 %, would otherwise weigh ~500).
    """
    prevalence = torch.as_tensor(prevalence, dtype=torch.float64)
    if prevalence.ndim != 1 or not torch.all((prevalence >= 0) & (prevalence <= 1)):
        raise ValueError(f"prevalence must be a 1-D tensor of fractions in [0, 1], got {prevalence.tolist()}")
    if max_weight < 1:
        raise ValueError(f"max_weight must be >= 1, got {max_weight!r}")
    ratio = (1 - prevalence) / prevalence.clamp_min(1e-12)
    return ratio.clamp(1 / max_weight, max_weight).tolist()


class XrayClassifier(L.LightningModule):
    """ViT-B/16 (by default) fine-tuned for the 15 NIH labels; the head has one output per `LABELS` entry.

    `backbone`, `weights`, `img_size`, `patch_size`, `drop_path_rate` and `global_pool` (timm's "token"
    or "avg"; None keeps the architecture's) go to `create_backbone`;
    `lr`, `weight_decay`, `layer_decay` and `betas` to AdamW over `param_groups`; `warmup_ratio` and
    `min_lr_ratio` shape the per-step `warmup_cosine` schedule over the whole run. `pos_weight` (one
    number per label, see `pos_weight_from_prevalence`) weighs positives in the BCE loss. `compile`
    compiles the backbone in place (`nn.Module.compile`, so checkpoint keys stay unchanged).
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        weights: str = "hub",
        img_size: int | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.05,
        warmup_ratio: float = 0.25,
        min_lr_ratio: float = 0.0,
        layer_decay: float | None = None,
        drop_path_rate: float = 0.0,
        pos_weight: list[float] | None = None,
        compile: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        patch_size: int | None = None,
        global_pool: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_optim_settings(lr, weight_decay, warmup_ratio, min_lr_ratio, layer_decay, betas)
        pos_weight_tensor = _pos_weight_tensor(pos_weight)
        # A wrong config fails above, before the (possibly long) weight download below.
        self.backbone = create_backbone(
            backbone,
            weights=weights,
            num_classes=NUM_LABELS,
            img_size=img_size,
            patch_size=patch_size,
            **({} if global_pool is None else {"global_pool": global_pool}),
            drop_path_rate=drop_path_rate,
        )
        # Not persistent: it is a hyperparameter, rebuilt from hparams, not a learned weight.
        self.register_buffer("pos_weight", pos_weight_tensor, persistent=False)
        # One metric object per stage (a ModuleDict cannot hold a key named "train": nn.Module.train).
        self.train_metrics = XrayMetrics(LABELS, "train")
        self.val_metrics = XrayMetrics(LABELS, "val")
        self.test_metrics = XrayMetrics(LABELS, "test")
        self.last_metrics: dict[str, dict[str, Any]] = {}
        # This epoch's (logits, labels) per batch, detached, on the device, per stage.
        self._epoch_outputs: dict[str, list[tuple[Tensor, Tensor]]] = {"train": [], "val": [], "test": []}
        # Host copies of the last validation and test passes (probabilities, labels): ROC plots, thresholds.
        self._eval_outputs: dict[str, tuple[Tensor, Tensor] | None] = {"val": None, "test": None}
        self._batch_lr: float | None = None
        if compile:
            if not hasattr(self.backbone, "compile"):  # nn.Module.compile: torch >= 2.2 (not the IPU stack)
                raise ValueError(
                    f"model.compile=true needs torch >= 2.2 (nn.Module.compile); "
                    f"this is torch {torch.__version__}"
                )
            self.backbone.compile()

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, *args: Any, **kwargs: Any) -> XrayClassifier:
        """Lightning's loader, after `open_checkpoint` read the file with weights_only=True: on the legacy
        stack (Lightning 2.0.9, torch 2.0.1) Lightning's own torch.load would run any code in the file."""
        open_checkpoint(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def forward(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] (normalised) -> logits [B, 15]."""
        return self.backbone(images)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Mean BCE-with-logits over batch and labels, positives weighted by `pos_weight` (if set)."""
        # In float32 whatever the precision plugin did to the logits or the buffer (bf16-true casts both).
        pos_weight = None if self.pos_weight is None else self.pos_weight.float()
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=pos_weight)

    def _shared_step(self, batch: Sequence[Tensor]) -> dict[str, Tensor]:
        images, labels = batch
        logits = self(images)
        return {"loss": self.loss(logits, labels), "logits": logits, "labels": labels}

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> dict[str, Tensor]:
        """{"loss" (with graph), "logits" [B, 15] detached, "labels" [B, 15]}; logs nothing."""
        outputs = self._shared_step(batch)
        outputs["logits"] = outputs["logits"].detach()
        return outputs

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> dict[str, Tensor]:
        """{"loss", "logits" [B, 15], "labels" [B, 15]}; logs nothing."""
        return self._shared_step(batch)

    def test_step(self, batch: Sequence[Tensor], batch_idx: int) -> dict[str, Tensor]:
        """{"loss", "logits" [B, 15], "labels" [B, 15]}; logs nothing."""
        return self._shared_step(batch)

    def predict_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> Tensor:
        """Probabilities [B, 15] (sigmoid per label) for images, or (images, ...) batches."""
        images = batch if isinstance(batch, Tensor) else batch[0]
        return torch.sigmoid(self(images))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning steps the scheduler before on_train_batch_end: read the lr this batch trains at now.
        optimizers = self.trainer.optimizers
        self._batch_lr = max(group["lr"] for group in optimizers[0].param_groups) if optimizers else None

    def on_train_batch_end(self, outputs: dict[str, Tensor], batch: Any, batch_idx: int) -> None:
        logits, labels = outputs["logits"], outputs["labels"]
        self._keep_batch("train", outputs)
        if not self._logger_writes_this_step():
            return  # self.log costs ~1 ms of host time per call, and its value would never be written
        # Lightning divides outputs["loss"] by accumulate_grad_batches; recompute the batch's own loss.
        # Not in the progress bar: Lightning reads every bar value back to the host after every batch.
        loss = self.loss(logits, labels)
        self.log("train/loss", loss, on_step=True, on_epoch=False, batch_size=len(logits))
        if self._batch_lr is not None:
            self.log("lr", self._batch_lr, on_step=True, on_epoch=False, batch_size=len(logits))

    def _logger_writes_this_step(self) -> bool:
        # Lightning writes step values when (batches that stepped, this one included) % n == 0; after the
        # optimizer step global_step counts this batch (an accumulating batch is never written anyway).
        every = self.trainer.log_every_n_steps
        return every > 0 and self.trainer.global_step % every == 0

    def on_validation_batch_end(
        self, outputs: dict[str, Tensor], batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._keep_batch("val", outputs)

    def on_test_batch_end(
        self, outputs: dict[str, Tensor], batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._keep_batch("test", outputs)

    def _keep_batch(self, stage: str, outputs: dict[str, Tensor]) -> None:
        self._epoch_outputs[stage].append((outputs["logits"].detach(), outputs["labels"].detach()))

    def on_train_epoch_start(self) -> None:
        self._epoch_outputs["train"] = []

    def on_validation_epoch_start(self) -> None:
        self._epoch_outputs["val"] = []

    def on_test_epoch_start(self) -> None:
        self._epoch_outputs["test"] = []

    def eval_outputs(self, stage: str) -> tuple[np.ndarray, np.ndarray] | None:
        """This process's last `stage` ("val" or "test") pass: probabilities and labels, float32 [N, 15]
        each (None if none; a sanity-check pass is not kept)."""
        if stage not in self._eval_outputs:
            raise ValueError(
                f"eval_outputs: stage must be one of {sorted(self._eval_outputs)}, got {stage!r}"
            )
        kept = self._eval_outputs[stage]
        if kept is None:
            return None
        probs, labels = kept
        return probs.numpy(), labels.numpy()

    def test_outputs(self) -> tuple[np.ndarray, np.ndarray] | None:
        """`eval_outputs("test")`."""
        return self.eval_outputs("test")

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # a couple of batches: no meaningful AUROC, keep nothing
            self._epoch_outputs["val"] = []
            return
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def _log_epoch(self, stage: str) -> None:
        metrics: XrayMetrics = getattr(self, f"{stage}_metrics")
        self._update_metrics(stage, metrics)
        values = metrics.compute()
        metrics.reset()
        self.last_metrics[stage] = values
        loss_key = "train/loss_epoch" if stage == "train" else f"{stage}/loss"
        headline = {loss_key: values["loss"], f"{stage}/auroc_macro14": values["auroc_macro14"]}
        rest = {f"{stage}/{name}": values[name] for name in ("auroc_macro15", "auroc_seed_compat")}
        for label, value in values["auroc_per_finding"].items():
            rest[f"{stage}/auroc/{label}"] = value
        # Every rank holds the same gathered values; sync_dist only keeps Lightning's DDP advice quiet.
        self.log_dict(headline, on_step=False, on_epoch=True, sync_dist=True, prog_bar=stage == "val")
        self.log_dict(rest, on_step=False, on_epoch=True, sync_dist=True)

    def _update_metrics(self, stage: str, metrics: XrayMetrics) -> None:
        """One metric update with the epoch's batches: this process's share, gathered by `compute`."""
        kept, self._epoch_outputs[stage] = self._epoch_outputs[stage], []
        if not kept:
            return
        logits = torch.cat([batch_logits for batch_logits, _ in kept])
        labels = torch.cat([batch_labels for _, batch_labels in kept])
        # The mean over the epoch's images, as a batch-size-weighted mean of batch losses would give.
        metrics.update(logits, labels, self.loss(logits, labels))
        if stage in self._eval_outputs:
            self._eval_outputs[stage] = (torch.sigmoid(logits.float()).cpu(), labels.float().cpu())

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over `param_groups`, and `warmup_cosine` stepped per optimizer step over the whole run."""
        hp = self.hparams
        groups = param_groups(self.backbone, hp.lr, hp.weight_decay, hp.layer_decay)
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps) or total_steps < 1:
            raise ValueError(
                f"the lr schedule needs a finite run: trainer.estimated_stepping_batches={total_steps}; "
                f"set trainer.max_epochs or trainer.max_steps"
            )
        scheduler = warmup_cosine(optimizer, int(total_steps), hp.warmup_ratio, hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def check_optim_settings(
    lr: float,
    weight_decay: float,
    warmup_ratio: float,
    min_lr_ratio: float,
    layer_decay: float | None,
    betas: Sequence[float],
) -> None:
    """Raise ValueError naming the first optimiser setting that cannot work (no model is built)."""
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"optim.lr must be a positive number, got {lr!r}")
    if weight_decay < 0:
        raise ValueError(f"optim.weight_decay must be >= 0, got {weight_decay!r}")
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ValueError(f"optim.layer_decay must be in (0, 1] or null, got {layer_decay!r}")
    if len(betas) != 2 or not all(0 <= beta < 1 for beta in betas):
        raise ValueError(f"optim.betas must be two numbers in [0, 1), got {betas!r}")
    warmup_cosine_factor(1, warmup_ratio, min_lr_ratio)  # raises ValueError naming the bad ratio


def _pos_weight_tensor(pos_weight: Sequence[float] | None) -> Tensor | None:
    if pos_weight is None:
        return None
    weights = torch.tensor([float(w) for w in pos_weight], dtype=torch.float32)
    if weights.shape != (NUM_LABELS,) or not torch.all(torch.isfinite(weights) & (weights > 0)):
        raise ValueError(
            f"model.pos_weight must be {NUM_LABELS} positive numbers (LABELS order), got {list(pos_weight)}"
        )
    return weights
