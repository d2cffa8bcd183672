"""DataModule loading rate: images/s per worker core with the default train augmentations.

Builds a synthetic NIH tree and its 256 px cache in a temporary folder (a few thousand images), then
measures, at input 224:

1. `transform`: the train transform alone on cache images, in this process (OpenCV default threads, and 1);
2. `dataset`: `CachedXrayDataset.__getitem__` in this process, random order (memmap read + transform);
3. `loader`: `NIHDataModule.train_dataloader()` with 1..W workers, batch 64, after a warm-up of a few
   batches (worker start-up excluded), as images/s and images/s per worker.

Writes `experiments/results/loader_throughput.json` with the machine (lscpu model, cores, load average)
and the date. Target: >= 1,000 images/s per worker core.

    python experiments/benchmarks/loader_throughput.py [--images 3000] [--workers 1 2] [--seconds 15]
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import albumentations
import cv2
import lightning
import numpy as np
import torch
from _machine import cpu_model

from xraycls.data.cache import cache_array_path, open_cache, prepare_cache
from xraycls.data.datamodule import NIHDataModule
from xraycls.data.datasets import CachedXrayDataset
from xraycls.data.synthetic import make_synthetic_nih
from xraycls.data.transforms import build_train_transform
from xraycls.findings import NUM_LABELS

RESULTS = Path(__file__).resolve().parents[1] / "results" / "loader_throughput.json"
TARGET_PER_CORE = 1000.0


def _rate(step, seconds: float) -> tuple[float, int]:
    """Calls of `step` per second over about `seconds` (after one untimed call)."""
    step()
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        step()
        count += 1
    return count / elapsed, count


def _per_process(cache_dir: Path, seconds: float) -> dict:
    """Single-process rates: the transform alone (OpenCV default threads, then 1) and the dataset item."""
    array, _index = open_cache(cache_dir, 256)
    images = np.array(array[:64])
    transform = build_train_transform(224)
    default_threads = cv2.getNumThreads()
    results = {}
    for threads in (default_threads, 1):
        cv2.setNumThreads(threads)
        cycle = itertools.cycle(images)
        rate, _ = _rate(lambda cycle=cycle: transform(image=next(cycle)), seconds / 2)
        results[f"transform_cv2_threads_{threads}"] = round(rate, 1)
    cv2.setNumThreads(default_threads)  # the loader runs below must see the usual setting
    dataset = CachedXrayDataset(
        cache_array_path(cache_dir, 256),
        256,
        np.arange(len(array)),
        np.zeros((len(array), NUM_LABELS), np.float32),
        transform,
    )
    order = itertools.cycle(np.random.default_rng(0).permutation(len(dataset)))
    rate, _ = _rate(lambda: dataset[next(order)], seconds / 2)
    results["dataset_getitem_random_order"] = round(rate, 1)
    return results


def _loader(cache_dir: Path, workers: int, batch_size: int, seconds: float, warmup: int = 3) -> dict:
    datamodule = NIHDataModule(
        cache_dir=str(cache_dir),
        image_size=256,
        input_size=224,
        split="patient_random",
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=False,
    )
    datamodule.setup("fit")
    images = batches = 0
    start = None
    while True:  # epochs repeat until enough time has been measured
        for batch_index, (batch, _labels) in enumerate(datamodule.train_dataloader()):
            if start is None:
                if batch_index + 1 >= warmup:
                    start = time.perf_counter()
                continue
            images += batch.shape[0]
            batches += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                rate = images / elapsed
                return {
                    "workers": workers,
                    "batch_size": batch_size,
                    "batches": batches,
                    "seconds": round(elapsed, 2),
                    "images_per_s": round(rate, 1),
                    "images_per_s_per_worker": round(rate / max(workers, 1), 1),
                }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0, help="measured time per loader setting")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--note", default="", help="free text stored with the result (e.g. other load)")
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="xraycls-loader-") as tmp:
        root, cache_dir = Path(tmp) / "raw", Path(tmp) / "cache"
        start = time.perf_counter()
        make_synthetic_nih(root, args.images, size=256, seed=0, min_prevalence=0.05, workers=cores)
        prepare_cache(root, cache_dir, size=256, workers=cores, progress=False)
        print(f"synthetic tree + 256px cache of {args.images} images: {time.perf_counter() - start:.1f} s")
        load_before = os.getloadavg()
        per_process = _per_process(cache_dir, args.seconds)
        print(json.dumps(per_process, indent=2))
        loaders = []
        for workers in args.workers:
            result = _loader(cache_dir, workers, args.batch_size, args.seconds)
            print(json.dumps(result))
            loaders.append(result)
        load_after = os.getloadavg()

    worst_per_worker = min(item["images_per_s_per_worker"] for item in loaders if item["workers"] > 0)
    report = {
        "benchmark": "loader_throughput",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu_model": cpu_model(),
            "cores_available": cores,
            "load_average_1_5_15_before": [round(x, 2) for x in load_before],
            "load_average_1_5_15_after": [round(x, 2) for x in load_after],
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "albumentations": albumentations.__version__,
            "opencv": cv2.__version__,
        },
        "setting": {
            "cache_size": 256,
            "input_size": 224,
            "images": args.images,
            "augment": "defaults of xraycls.data.transforms.TrainAugment",
        },
        "per_process_images_per_s": per_process,
        "loader": loaders,
        "target_images_per_s_per_worker": TARGET_PER_CORE,
        "meets_target": worst_per_worker >= TARGET_PER_CORE,  # every worker count measured
        "note": args.note,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
