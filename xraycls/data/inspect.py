"""One timed pass of the DataModule over a cache, with the data summary: the sanity check before training."""

from __future__ import annotations

import time
from typing import Any

from xraycls.data.datamodule import NIHDataModule

__all__ = ["inspect_datamodule"]


def inspect_datamodule(
    *, cache_dir: str, root: str | None = None, batch_size: int = 64, **datamodule_kwargs: Any
) -> dict:
    """Prepare (if needed) and set up an `NIHDataModule`, read every training batch once, and report.

    The report is the DataModule's `data_summary()` plus `loader_pass`: batches, images, batch shape and
    dtype, seconds and images/s of the pass (workers' start-up included, so it understates the steady rate).
    """
    datamodule = NIHDataModule(root=root, cache_dir=cache_dir, batch_size=batch_size, **datamodule_kwargs)
    datamodule.prepare_data()
    datamodule.setup("fit")
    start = time.perf_counter()
    batches = images = 0
    shape = dtype = None
    for images_u8, _labels in datamodule.train_dataloader():
        batches += 1
        images += images_u8.shape[0]
        shape, dtype = list(images_u8.shape), str(images_u8.dtype)
    seconds = time.perf_counter() - start
    summary = datamodule.data_summary()
    summary["loader_pass"] = {
        "batches": batches,
        "images": images,
        "batch_shape": shape,
        "dtype": dtype,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 1) if seconds > 0 else None,
    }
    return summary
