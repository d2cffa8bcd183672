"""DataModule loading rate: images/s per worker core with the default train augmentations.

Over a synthetic NIH tree and its cache in a temporary folder (`--images`), the DataModule of the project's
config (`data=nih`: cache 256 px, input 224, its train augmentations): the train transform alone and the
dataset's `__getitem__` (random order) in this process, then `train_dataloader()` with each `--workers`
count, batch 64, after a warm-up of a few batches (worker start-up excluded). Target: >= 1,000 images/s
per worker core. Writes `experiments/results/loader_throughput.json` (machine, load average, date).

    python experiments/benchmarks/loader_throughput.py [--images 3000] [--workers 1 2] [--seconds 15]
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

import albumentations
import cv2
import lightning
import numpy as np
import torch
from _common import RESULTS, compose_config, machine, rate, versions, write

from xraycls.data.cache import open_cache, prepare_cache
from xraycls.data.datamodule import NIHDataModule
from xraycls.data.synthetic import make_synthetic_nih
from xraycls.training.config import instantiate

TARGET_PER_CORE = 1000.0


def _datamodule(tmp: Path, cache_dir: Path, workers: int, batch_size: int) -> NIHDataModule:
    """The config's NIHDataModule over the benchmark's cache, set up for fit."""
    overrides = [f"data.cache_dir={cache_dir}", "data.split=patient_random", "data.pin_memory=false"]
    cfg = compose_config(
        ["data=nih", *overrides, f"data.num_workers={workers}", f"data.batch_size={batch_size}"], tmp
    )
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    return datamodule


def _per_process(datamodule: NIHDataModule, seconds: float) -> dict:
    """Single-process rates: the transform alone (OpenCV default threads, then 1) and the dataset item."""
    array, _index = open_cache(datamodule.hparams.cache_dir, datamodule.hparams.image_size)
    images, transform = np.array(array[:64]), datamodule.train_transform
    default_threads, results = cv2.getNumThreads(), {}
    for threads in (default_threads, 1):
        cv2.setNumThreads(threads)
        cycle = itertools.cycle(images)
        per_s = rate(lambda cycle=cycle: transform(image=next(cycle)), seconds / 2)
        results[f"transform_cv2_threads_{threads}"] = round(per_s, 1)
    cv2.setNumThreads(default_threads)  # the loader runs below must see the usual setting
    dataset = datamodule.datasets["train"]
    order = itertools.cycle(np.random.default_rng(0).permutation(len(dataset)))
    results["dataset_getitem_random_order"] = round(rate(lambda: dataset[next(order)], seconds / 2), 1)
    return results


def _loader(datamodule: NIHDataModule, seconds: float, warmup: int = 3) -> dict:
    """Epochs of `train_dataloader()` until `seconds` have been measured, the first `warmup` batches not."""
    workers, images, batches, start = datamodule.hparams.num_workers, 0, 0, None
    while True:
        for index, (batch, _labels) in enumerate(datamodule.train_dataloader()):
            if start is None:
                start = time.perf_counter() if index + 1 >= warmup else None
                continue
            images, batches = images + batch.shape[0], batches + 1
            if (elapsed := time.perf_counter() - start) >= seconds:
                return {
                    "workers": workers,
                    "batch_size": datamodule.hparams.batch_size,
                    "batches": batches,
                    "seconds": round(elapsed, 2),
                    "images_per_s": round(images / elapsed, 1),
                    "images_per_s_per_worker": round(images / elapsed / max(workers, 1), 1),
                }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0, help="measured time per loader setting")
    parser.add_argument("--out", type=Path, default=RESULTS / "loader_throughput.json")
    parser.add_argument("--note", default="", help="free text stored with the result (e.g. other load)")
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="xraycls-loader-") as tmp:
        root, cache_dir = Path(tmp) / "raw", Path(tmp) / "cache"
        data_cfg = compose_config([], tmp).data
        start = time.perf_counter()
        make_synthetic_nih(
            root, args.images, size=data_cfg.image_size, seed=0, min_prevalence=0.05, workers=cores
        )
        prepare_cache(root, cache_dir, size=data_cfg.image_size, workers=cores, progress=False)
        print(f"synthetic tree + cache of {args.images} images: {time.perf_counter() - start:.1f} s")
        load_before = os.getloadavg()
        per_process = _per_process(_datamodule(Path(tmp), cache_dir, 0, args.batch_size), args.seconds)
        print(json.dumps(per_process, indent=2))
        loaders = []
        for workers in args.workers:
            loaders.append(_loader(_datamodule(Path(tmp), cache_dir, workers, args.batch_size), args.seconds))
            print(json.dumps(loaders[-1]))
        machine_block = machine(load_before)

    worst_per_worker = min(item["images_per_s_per_worker"] for item in loaders if item["workers"] > 0)
    report = {
        "benchmark": "loader_throughput",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_block,
        "versions": versions(torch, lightning, albumentations, cv2),
        "setting": {
            "cache_size": data_cfg.image_size,
            "input_size": data_cfg.input_size,
            "images": args.images,
            "augment": "conf/data/nih.yaml's (the TrainAugment defaults)",
        },
        "per_process_images_per_s": per_process,
        "loader": loaders,
        "target_images_per_s_per_worker": TARGET_PER_CORE,
        "meets_target": worst_per_worker >= TARGET_PER_CORE,  # every worker count measured
        "note": args.note,
    }
    write(args.out, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
