"""The GPU path on a real CUDA device: the tiny ViT compiled, one bf16-mixed training step through a real
Lightning Trainer; the loss is finite and the weights move. Skipped (marker `gpu`) where torch sees no GPU."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from xraycls.findings import NUM_LABELS
from xraycls.model.module import XrayClassifier

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


class _LossProbe(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, *args) -> None:  # noqa: ANN001
        self.losses.append(float(outputs["loss"]))


def one_step(
    backbone: str, backbone_kwargs: dict, accelerator: str = "gpu", compile: bool = True
) -> tuple[list[float], float]:
    """(losses, largest absolute weight change) of one bf16-mixed optimizer step of the compiled tiny ViT."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 64, 64, generator=generator)
    labels = (torch.rand(8, NUM_LABELS, generator=generator) < 0.5).float()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        # warmup_ratio 0: the first step trains at the peak lr (the warm-up would start it at 0).
        module = XrayClassifier(
            backbone=backbone, weights="none", warmup_ratio=0.0, compile=compile, **backbone_kwargs
        )
    before = {name: p.detach().clone() for name, p in module.backbone.named_parameters()}
    probe = _LossProbe()
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision="bf16-mixed",
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[probe],
    )
    trainer.fit(module, DataLoader(TensorDataset(images, labels), batch_size=8))
    after = dict(module.backbone.named_parameters())
    change = max(
        (after[name].detach().cpu() - value.cpu()).abs().max().item() for name, value in before.items()
    )
    return probe.losses, change


def test_one_compiled_bf16_step_trains_on_the_gpu(tiny_backbone: str, tiny_backbone_kwargs: dict) -> None:
    losses, change = one_step(tiny_backbone, tiny_backbone_kwargs, "gpu")
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses)).all()
    assert change > 0
