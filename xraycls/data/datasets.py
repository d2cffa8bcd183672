"""Datasets over the uint8 cache (the training path) and over the PNG files (no cache needed).

Both return `(image, labels)`: image a uint8 tensor [H, W] (after the transform, H = W = input size),
labels a float32 tensor [15] in `xraycls.findings.LABELS` order, row-aligned with the `rows`/`names`
and `labels` they were built from. Normalisation happens later, on the device (`DeviceNormalize`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from xraycls.data.images import ImageDecodeError, load_xray
from xraycls.findings import NUM_LABELS

__all__ = ["CachedXrayDataset", "PngXrayDataset", "EpochSeededSampler", "open_image_array"]

log = logging.getLogger(__name__)

# An albumentations Compose (or any callable taking image= and returning {"image": HxW uint8}).
Transform = Callable[..., dict[str, Any]]
# What a dataset is indexed with: a position, or (position, augmentation seed) from EpochSeededSampler.
Key = int | tuple[int, int]


class EpochSeededSampler(Sampler[tuple[int, int]]):
    """Shuffles by `(seed, epoch)` and gives every draw its own augmentation seed.

    Yields `(position, sample_seed)`. Both depend only on the seed, the epoch (set by Lightning's fit loop
    through `set_epoch`) and the draw's place in the epoch, never on global RNG state or the number of
    workers: a run resumed from a checkpoint at epoch k sees exactly the batches and augmentations an
    uninterrupted run saw, and 0 or 8 workers give the same result.
    """

    def __init__(self, length: int, seed: int) -> None:
        self.length = int(length)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        sequence = np.random.SeedSequence([self.seed, self.epoch])
        order_seed, augment_seed = sequence.spawn(2)
        order = np.random.default_rng(order_seed).permutation(self.length)
        sample_seeds = augment_seed.generate_state(self.length)
        return iter(zip(order.tolist(), sample_seeds.tolist(), strict=True))


def _split_key(key: Key) -> tuple[int, int | None]:
    if isinstance(key, tuple):
        return int(key[0]), int(key[1])
    return int(key), None


def open_image_array(path: str | Path, size: int) -> np.ndarray:
    """Open the cache's image array read-only without reading it: uint8 memmap [N, size, size].

    Accepts a `.npy` file (shape from its header) or a raw uint8 file (N from its length).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cache image array not found: {path}")
    if path.suffix == ".npy":
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    else:
        nbytes = path.stat().st_size
        if nbytes % (size * size):
            raise ValueError(f"{path}: {nbytes} bytes is not a whole number of {size}x{size} uint8 images")
        array = np.memmap(path, dtype=np.uint8, mode="r", shape=(nbytes // (size * size), size, size))
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[1:] != (size, size):
        raise ValueError(f"{path}: expected uint8 [N, {size}, {size}], got {array.dtype} {list(array.shape)}")
    return array


def _as_label_matrix(labels: np.ndarray, count: int, what: str) -> np.ndarray:
    labels = np.ascontiguousarray(labels, dtype=np.float32)
    if labels.shape != (count, NUM_LABELS):
        raise ValueError(
            f"labels must be [{count}, {NUM_LABELS}] (one row per {what}), got {list(labels.shape)}"
        )
    return labels


class _WorkerAware(Dataset):
    """Reseeds the transform once per process and DataLoader iterator.

    albumentations draws from a generator inside the Compose; forked DataLoader workers would inherit the
    same state and apply the same "random" crops in step. Each worker instead takes the per-worker seed the
    DataLoader derives from torch's generator, so runs seeded with `L.seed_everything` are reproducible.
    NOTE: OpenCV's thread count is deliberately left alone here: `cv2.setNumThreads` in a forked worker
    deadlocks once the parent has used OpenCV's thread pool (seen with OpenCV 5.0 on Linux).
    """

    transform: Transform | None
    _prepared_for: tuple[int, int] | None = None

    def _prepare_process(self) -> None:
        info = get_worker_info()
        seed = info.seed if info is not None else torch.initial_seed()
        key = (os.getpid(), seed)
        if key == self._prepared_for:
            return
        if self.transform is not None and hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed % 2**32)
        self._prepared_for = key

    def _apply(self, image: np.ndarray, sample_seed: int | None = None) -> torch.Tensor:
        if self.transform is not None:
            if sample_seed is not None and hasattr(self.transform, "set_random_seed"):
                self.transform.set_random_seed(sample_seed)
                self._prepared_for = None
            else:
                self._prepare_process()
            image = self.transform(image=image)["image"]
        return torch.from_numpy(np.ascontiguousarray(image))


class CachedXrayDataset(_WorkerAware):
    """Images from the cache memmap, selected by `rows` (positions in the cache's index.csv).

    The memmap is opened lazily in each process and never pickled: workers receive only the path.
    """

    def __init__(
        self,
        array_path: str | Path,
        size: int,
        rows: Sequence[int] | np.ndarray,
        labels: np.ndarray,
        transform: Transform | None = None,
    ) -> None:
        self.array_path = Path(array_path)
        self.size = size
        self.rows = np.asarray(rows, dtype=np.int64)
        if self.rows.ndim != 1:
            raise ValueError(f"rows must be 1-D positions in the cache, got shape {list(self.rows.shape)}")
        self.labels = _as_label_matrix(labels, len(self.rows), "row")
        self.transform = transform
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def _images(self) -> np.ndarray:
        if self._array is None:
            self._array = open_image_array(self.array_path, self.size)
            if len(self.rows) and not 0 <= int(self.rows.min()) <= int(self.rows.max()) < len(self._array):
                raise IndexError(
                    f"rows span {int(self.rows.min())}..{int(self.rows.max())} but {self.array_path} "
                    f"holds {len(self._array)} images"
                )
        return self._array

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        index, sample_seed = _split_key(key)
        # np.array copies the one image out of the page cache, so the transform never touches the memmap.
        image = np.array(self._images()[self.rows[index]])
        return self._apply(image, sample_seed), torch.from_numpy(self.labels[index])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_array"] = None
        return state


class PngXrayDataset(_WorkerAware):
    """Images decoded from `image_dir/<name>` on the fly with `load_xray` (same size rule as the cache).

    Corrupt images: with `skip_corrupt=True` (default) an image that fails to decode is logged as a
    warning naming the file and replaced by the next decodable image of the dataset (with that image's
    labels), so a batch keeps its fixed size and a long job goes on; every corrupt name is kept in
    `self.corrupt` of the process that met it. With `skip_corrupt=False` the `ImageDecodeError` (naming the
    file) propagates. The cache path drops and reports corrupt images once, at prepare time, instead.
    """

    def __init__(
        self,
        image_dir: str | Path,
        names: Sequence[str],
        labels: np.ndarray,
        size: int,
        transform: Transform | None = None,
        *,
        skip_corrupt: bool = True,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.names = [str(name) for name in names]
        self.labels = _as_label_matrix(labels, len(self.names), "image name")
        self.size = size
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.corrupt: set[str] = set()

    def __len__(self) -> int:
        return len(self.names)

    def _decode(self, index: int) -> tuple[np.ndarray, int]:
        for offset in range(len(self.names)):
            position = (index + offset) % len(self.names)
            name = self.names[position]
            if name in self.corrupt:
                continue
            try:
                return load_xray(self.image_dir / name, self.size), position
            except ImageDecodeError as error:
                if not self.skip_corrupt:
                    raise
                self.corrupt.add(name)
                log.warning("skipping corrupt image %s (%s); using the next readable image", name, error)
        raise ImageDecodeError(
            str(self.image_dir), f"none of its {len(self.names)} listed images is readable"
        )

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        index, sample_seed = _split_key(key)
        image, position = self._decode(index)
        return self._apply(image, sample_seed), torch.from_numpy(self.labels[position])
