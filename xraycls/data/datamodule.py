"""`NIHDataModule`: the uint8 cache (or the PNG files) -> split -> augmented uint8 batches -> device floats.

`prepare_data` (one process per node) writes the cache if it is missing or incomplete; `setup` (every rank)
opens it read-only, applies the split and builds the datasets. Batches are `(images, labels)`: uint8
[B, H, W] and float32 [B, 15] out of the DataLoader, float32 [B, 3, H, W] and float32 [B, 15] after
`on_after_batch_transfer`, the one place where images are normalised.

Under DDP the evaluation loaders shard without padding (`eval_sampler`): Lightning's default
`DistributedSampler` repeats images to even out the ranks, and a repeat would enter the gathered whole-set
AUROC twice. Uneven shares are safe in evaluation: DDP synchronises nothing in a forward pass without
gradients, and torchmetrics gathers states of different lengths. Training keeps Lightning's wrapper around
`EpochSeededSampler` (equal shares, drop_last batches: every rank takes the same optimizer steps).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler

from xraycls.data.cache import cache_array_path, cache_is_complete, open_cache, prepare_cache
from xraycls.data.datasets import CachedXrayDataset, EpochSeededSampler, PngXrayDataset
from xraycls.data.labels import find_label_file
from xraycls.data.splits import (
    PARTS,
    ROW_ORDERS,
    SPLIT_NAMES,
    SplitAssignment,
    SplitSettings,
    labelled_images,
)
from xraycls.data.transforms import DeviceNormalize, build_eval_transform, build_train_transform
from xraycls.findings import LABELS

__all__ = ["NIHDataModule", "SOURCES", "eval_sampler", "per_device_batch_size"]

log = logging.getLogger(__name__)

SOURCES: tuple[str, ...] = ("cache", "png")


def per_device_batch_size(global_batch: int, world_size: int) -> int:
    """The batch each device loads per step, so that all devices together load `global_batch`."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if global_batch % world_size:
        raise ValueError(
            f"batch_size={global_batch} (the global batch per step) is not divisible by the world size "
            f"{world_size} (devices x nodes); choose a multiple of {world_size}"
        )
    return global_batch // world_size


def eval_sampler(dataset: Dataset, rank: int | None = None, world_size: int | None = None) -> Sampler | None:
    """This rank's share of an evaluation set without padding (rank r takes images r, r + W, ...; shares
    differ by at most one), or None (the loader's plain order) for one process. `rank`/`world_size` default
    to the initialised process group's. Lightning leaves the sampler alone: it is a `DistributedSampler`."""
    if world_size is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        rank, world_size = dist.get_rank(), dist.get_world_size()
    if world_size < 2:
        return None
    return UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class NIHDataModule(L.LightningDataModule):
    """NIH ChestX-ray14 from the uint8 cache (`source="cache"`) or straight from the PNGs (`source="png"`).

    `batch_size` is the global batch per step over all devices; `setup` divides it by the trainer's world
    size (devices x nodes). Gradient accumulation, if any, comes on top of it. `split` is one of
    `xraycls.data.splits.SPLIT_NAMES`; `val_fraction`/`test_fraction`/`split_seed` shape the random splits,
    and `split_row_order` (`label_file` | `file_name`) is the row order `seed_random` permutes.
    `augment` takes the fields of `xraycls.data.transforms.TrainAugment` (e.g. `{"hflip_p": 0.5}`).
    `seed` fixes the training order and augmentation per epoch (`EpochSeededSampler`), so a resumed run
    repeats an uninterrupted one. `shuffle_train_labels` permutes the label rows of the train part
    across its images: a control run whose AUROC must stay near 0.5 if nothing leaks.
    """

    def __init__(
        self,
        root: str | None = None,
        cache_dir: str | None = None,
        source: str = "cache",
        image_size: int = 256,
        input_size: int = 224,
        split: str = "official",
        split_seed: int = 0,
        val_fraction: float | None = None,
        test_fraction: float | None = None,
        split_row_order: str = "label_file",
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: bool = True,
        augment: dict | None = None,
        mean: float = 0.5,
        std: float = 0.5,
        prepare_workers: int | None = None,
        seed: int = 0,
        shuffle_train_labels: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # Every check that needs no file runs here, so a wrong config stops before any work.
        if source not in SOURCES:
            raise ValueError(f"unknown data source {source!r}; choose one of {list(SOURCES)}")
        if split not in SPLIT_NAMES:
            raise ValueError(f"unknown split {split!r}; choose one of {list(SPLIT_NAMES)}")
        if split_row_order not in ROW_ORDERS:
            raise ValueError(f"unknown split_row_order {split_row_order!r}; choose one of {list(ROW_ORDERS)}")
        if source == "cache" and not cache_dir:
            raise ValueError("source='cache' needs cache_dir (the folder of the uint8 cache)")
        if source == "png" and not root:
            raise ValueError("source='png' needs root (the NIH folder with images/ and the label file)")
        for name, value in (
            ("image_size", image_size),
            ("input_size", input_size),
            ("batch_size", batch_size),
        ):
            _positive_int(name, value)
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        self.train_transform = build_train_transform(input_size, **(augment or {}))
        self.eval_transform = build_eval_transform(input_size)
        self.normalize = DeviceNormalize(mean=mean, std=std, channels=3)

        self.per_device_batch: int | None = None
        self.table: pd.DataFrame | None = None
        self.assignment: SplitAssignment | None = None
        self.datasets: dict[str, Dataset] = {}

    # ----------------------------------------------------------------------------------------- writing
    def prepare_data(self) -> None:
        """Build the cache if it is missing or incomplete (source="cache"); nothing to write for "png"."""
        if self.hparams.source != "cache":
            return
        cache_dir = Path(self.hparams.cache_dir)
        if cache_is_complete(cache_dir, self.hparams.image_size):
            return
        self.check_sources()
        log.info(
            "building the %dpx cache in %s from %s", self.hparams.image_size, cache_dir, self.hparams.root
        )
        prepare_cache(
            Path(self.hparams.root),
            cache_dir,
            size=self.hparams.image_size,
            workers=self.hparams.prepare_workers,
        )

    def check_sources(self) -> None:
        """Raise FileNotFoundError, reading no image, unless the data can be had: a finished cache of this
        size (source="cache"), or a root with images/ and a label file to build or read it from."""
        hp = self.hparams
        if hp.source == "cache" and cache_is_complete(Path(hp.cache_dir), hp.image_size):
            return
        if not hp.root:
            raise FileNotFoundError(
                f"no complete {hp.image_size}px cache in {hp.cache_dir} and no root to build it from: "
                "set root to the NIH folder (images/ + label file) or cache_dir to a finished cache"
            )
        images = Path(hp.root) / "images"
        if not images.is_dir():
            cache = (
                f" and no complete {hp.image_size}px cache in {hp.cache_dir}" if hp.source == "cache" else ""
            )
            raise FileNotFoundError(f"no images folder at {images} (expected ROOT/images/*.png){cache}")
        find_label_file(Path(hp.root))  # raises, naming the file names it looked for

    # ----------------------------------------------------------------------------------------- reading
    def setup(self, stage: str | None = None) -> None:
        """Open the data read-only, split it and build the three datasets (once), and derive the per-device
        batch from the trainer's world size (every call: the trainer may change between calls)."""
        world_size = getattr(self.trainer, "world_size", 1) if self.trainer is not None else 1
        self.per_device_batch = per_device_batch_size(self.hparams.batch_size, world_size)
        if not self.datasets:
            self._build_datasets()
        train_size = len(self.datasets["train"])
        if stage in (None, "fit") and train_size < self.per_device_batch:
            raise ValueError(
                f"the train part has {train_size} images, fewer than one per-device batch of "
                f"{self.per_device_batch}; with drop_last there would be no training step (lower batch_size)"
            )

    def split_settings(self) -> SplitSettings:
        """The split this DataModule builds, as `build_split` takes it."""
        hp = self.hparams
        return SplitSettings(hp.split, hp.split_seed, hp.val_fraction, hp.test_fraction, hp.split_row_order)

    def _build_datasets(self) -> None:
        hp = self.hparams
        table, make = self._cache_source() if hp.source == "cache" else self._png_source()
        assignment = self.split_settings().build(table)
        labels = table[list(LABELS)].to_numpy(dtype=np.float32)
        for part in PARTS:
            rows = np.asarray(assignment.indices(part), dtype=np.int64)
            part_labels = labels[rows]
            if part == "train" and hp.shuffle_train_labels:
                part_labels = part_labels[np.random.default_rng(hp.seed).permutation(len(rows))]
                log.warning("control run: training labels are shuffled across images (shuffle_train_labels)")
            transform = self.train_transform if part == "train" else self.eval_transform
            self.datasets[part] = make(rows, part_labels, transform)
        self.table, self.assignment = table, assignment
        log.info(
            "data: source=%s split=%s, train/val/test = %d/%d/%d images",
            hp.source,
            hp.split,
            *(len(self.datasets[part]) for part in PARTS),
        )

    def _cache_source(self) -> tuple[pd.DataFrame, Any]:
        hp = self.hparams
        # open_cache checks the cache is complete and its array and index agree; the memmap itself is
        # dropped here and reopened lazily from the path by each process that reads it.
        _array, index = open_cache(Path(hp.cache_dir), hp.image_size)
        array_path = cache_array_path(Path(hp.cache_dir), hp.image_size)

        def make(rows: np.ndarray, labels: np.ndarray, transform: Any) -> Dataset:
            return CachedXrayDataset(array_path, hp.image_size, rows, labels, transform)

        return index.reset_index(drop=True), make

    def _png_source(self) -> tuple[pd.DataFrame, Any]:
        hp = self.hparams
        image_dir = Path(hp.root) / "images"
        table = labelled_images(Path(hp.root))
        names = table["image"].tolist()

        def make(rows: np.ndarray, labels: np.ndarray, transform: Any) -> Dataset:
            return PngXrayDataset(image_dir, [names[i] for i in rows], labels, hp.image_size, transform)

        return table, make

    # ------------------------------------------------------------------------------------- dataloaders
    def _loader(self, part: str, *, train: bool) -> DataLoader:
        if not self.datasets or self.per_device_batch is None:
            raise RuntimeError("NIHDataModule.setup() must run before asking for a dataloader")
        workers = self.hparams.num_workers
        dataset = self.datasets[part]
        return DataLoader(
            dataset,
            batch_size=self.per_device_batch,
            sampler=EpochSeededSampler(len(dataset), self.hparams.seed) if train else eval_sampler(dataset),
            # Every training step has the same batch shape: the IPU strategy compiles the step for one shape.
            drop_last=train,
            num_workers=workers,
            # Pinned pages only help a copy to a CUDA device; elsewhere torch warns and ignores them.
            pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
            persistent_workers=workers > 0 and part in ("train", "val"),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 images -> normalised float32 [B,3,H,W], on whatever device the batch now lives."""
        images, labels = batch
        self.normalize.to(images.device)
        return self.normalize(images), labels

    # ----------------------------------------------------------------------------------------- reports
    def _require_setup(self) -> tuple[pd.DataFrame, SplitAssignment]:
        if self.table is None or self.assignment is None:
            raise RuntimeError("NIHDataModule.setup() must run first")
        return self.table, self.assignment

    def data_summary(self) -> dict:
        """Split name, source, sizes and batch, plus the split's own summary (images, patients and positives
        per label per part, leaked patients, whether test is the val set)."""
        table, assignment = self._require_setup()
        hp = self.hparams
        return {
            "split": hp.split,
            "split_row_order": hp.split_row_order,
            "source": hp.source,
            "image_size": hp.image_size,
            "input_size": hp.input_size,
            "global_batch": hp.batch_size,
            "per_device_batch": self.per_device_batch,
            **assignment.summary(table),
        }

    def train_label_prevalence(self) -> torch.Tensor:
        """Fraction of training images positive for each label: float32 [15], in LABELS order."""
        table, assignment = self._require_setup()
        rows = np.asarray(assignment.indices("train"), dtype=np.int64)
        labels = table[list(LABELS)].to_numpy(dtype=np.float32)[rows]
        return torch.from_numpy(labels.mean(axis=0))
