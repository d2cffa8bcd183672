"""The cache-fed data of `train_throughput.py`: a synthetic NIH tree, its uint8 cache and two DataModules."""

from __future__ import annotations

import time
from pathlib import Path

from _train_config import BenchConfig

from xraycls.data.cache import prepare_cache
from xraycls.data.datamodule import NIHDataModule
from xraycls.data.synthetic import make_synthetic_nih

__all__ = ["make_cache", "make_datamodules"]


def make_cache(base: Path, cfg: BenchConfig, cache_size: int, cores: int) -> tuple[Path, float, dict]:
    """A synthetic NIH tree and its cache, sized so that one epoch holds every measured batch.

    The "seed_random" split (image-level, exact sizes) gives train >= train_total batches and val >=
    eval_total eval batches. Returns the cache folder, the val fraction and the sizes.
    """
    need_train, need_val = cfg.train_total * cfg.batch_size, cfg.eval_total * cfg.eval_batch_size
    n = need_train + need_val + cfg.batch_size + cfg.eval_batch_size
    val_fraction = (need_val + cfg.eval_batch_size // 2) / n
    root, cache_dir = base / "raw", base / "cache"
    # Spawned pool processes re-import this script (torch, Lightning, timm): worth it for big sets only.
    workers = cores if n > 4000 else 1
    start = time.perf_counter()
    # PNGs at <= 64 px (fast to render); prepare resizes them to the cache side like any NIH image.
    make_synthetic_nih(root, n, size=min(cache_size, 64), seed=cfg.seed, workers=workers)
    prepare_cache(root, cache_dir, size=cache_size, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    print(f"synthetic tree + {cache_size}px cache of {n} images: {seconds:.1f} s", flush=True)
    return cache_dir, val_fraction, {"images": n, "cache_size": cache_size, "seconds": round(seconds, 1)}


def make_datamodules(
    cache_dir: Path, cfg: BenchConfig, cache_size: int, val_fraction: float, workers: int
) -> tuple[NIHDataModule, NIHDataModule]:
    """Two `NIHDataModule`s over the cache, set up: batch `batch_size` (train) and `eval_batch_size` (val).

    Everything else is the DataModule's defaults, which are conf/data/nih.yaml's (train augmentations
    included, pinned memory where CUDA is). Raises RuntimeError if one epoch holds fewer full batches than
    a measured run needs.
    """

    def make(batch: int) -> NIHDataModule:
        return NIHDataModule(
            cache_dir=str(cache_dir), image_size=cache_size, input_size=cfg.input_size,
            split="seed_random", val_fraction=val_fraction, batch_size=batch, num_workers=workers,
            seed=cfg.seed,
        )  # fmt: skip

    train_dm, eval_dm = make(cfg.batch_size), make(cfg.eval_batch_size)
    train_dm.setup("fit")
    eval_dm.setup("validate")
    train_batches = len(train_dm.datasets["train"]) // cfg.batch_size
    eval_batches = len(eval_dm.datasets["val"]) // cfg.eval_batch_size
    if train_batches < cfg.train_total or eval_batches < cfg.eval_total:
        raise RuntimeError(
            f"cache too small: {train_batches} train / {eval_batches} val full batches, "
            f"need {cfg.train_total} / {cfg.eval_total}"
        )
    return train_dm, eval_dm
