"""DDP evaluation without padding: every validation/test image counted exactly once over all ranks.

Under DDP, Lightning gives evaluation loaders a `DistributedSampler`, which pads each rank's share to the
same length by repeating the first images. Those repeats enter the gathered predictions twice and bias
the whole-set AUROC. `unpad_eval_loaders` makes a DataModule's val/test loaders carry Lightning's own
`UnrepeatedDistributedSampler` (rank r takes images r, r + W, r + 2W, ...; shares differ by at most one),
which Lightning then leaves alone because it already is a `DistributedSampler`. Uneven shares are safe in
evaluation: DDP synchronises nothing in a forward pass without gradients, and torchmetrics gathers states
of different lengths. Training keeps Lightning's `DistributedSamplerWrapper` around `EpochSeededSampler`
(equal shares, drop_last batches, so every rank takes the same number of optimizer steps).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

__all__ = ["unpadded_loader", "unpad_eval_loaders", "EVAL_LOADERS"]

EVAL_LOADERS = ("val_dataloader", "test_dataloader")


def unpadded_loader(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """The same loader (batch size, workers, pinning, collate) over this rank's unpadded share, in order."""
    if world_size < 2:
        return loader
    sampler = UnrepeatedDistributedSampler(loader.dataset, num_replicas=world_size, rank=rank, shuffle=False)
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        drop_last=loader.drop_last,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        persistent_workers=loader.persistent_workers,
        worker_init_fn=loader.worker_init_fn,
    )


def _sharded(make_loader: Callable[[], DataLoader]) -> Callable[[], DataLoader]:
    def make() -> DataLoader:
        loader = make_loader()
        if not (dist.is_available() and dist.is_initialized()):
            return loader
        return unpadded_loader(loader, dist.get_rank(), dist.get_world_size())

    return make


def unpad_eval_loaders(datamodule: Any) -> None:
    """Wrap the DataModule's `val_dataloader`/`test_dataloader` (on this instance) so that, once the
    process group is up, they shard without padding. Single-process runs are unchanged."""
    for name in EVAL_LOADERS:
        setattr(datamodule, name, _sharded(getattr(datamodule, name)))
