"""Prepare throughput per core on the real NIH sample (100 PNGs, 1024 x 1024) against a plain PIL loop.

The same job, file -> 8-bit gray S x S array (S = the config's `data.image_size`), one core each (OpenCV
held to 1 thread), files in the page cache: plain PIL (`convert("L").resize(..., Image.BOX)`, area
averaging), `load_xray` (the project's decoding rule alone) and `prepare_cache(workers=1)` (the whole
`xraycls prepare`: labels, chunk files, assembly). `--rounds` rounds in rotation; the best round counts
(least disturbed by other work on a shared machine), the median is reported too. Target: prepare >= 1.2x
plain PIL. Writes `prepare_throughput_<date>.md` (table, machine, JSON) into `--out`.

    python experiments/benchmarks/prepare_throughput.py [--rounds 15] [--out experiments/results]
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import PIL
from _common import (
    NIH_SHARED,
    RESULTS,
    compose_config,
    cpu_model,
    markdown,
    median,
    table,
    versions,
    write,
)
from _nih_sample import link_shared_sample
from PIL import Image

from xraycls.data.cache import prepare_cache
from xraycls.data.images import load_xray

TARGET = 1.2


def run(rounds: int, size: int) -> dict:
    cv2.setNumThreads(1)
    paths = sorted((NIH_SHARED / "sample").glob("*.png"))
    if len(paths) != 100:
        raise FileNotFoundError(
            f"expected the 100 NIH sample PNGs in {NIH_SHARED / 'sample'}, found {len(paths)}"
        )
    for path in paths:  # into the page cache
        path.read_bytes()

    def plain_pil(_round: int) -> None:
        for path in paths:
            with Image.open(path) as image:
                np.asarray(image.convert("L").resize((size, size), Image.BOX))

    def prepare(round_number: int) -> None:
        cache = Path(tmp) / f"cache{round_number}"
        report = prepare_cache(root, cache, size=size, workers=1, chunk_size=25, progress=False)
        assert report["ok"] == 100, report
        shutil.rmtree(cache)

    methods = {
        "plain_pil": plain_pil,
        "load_xray": lambda _round: [load_xray(path, size) for path in paths],
        "prepare_workers_1": prepare,
    }
    seconds: dict[str, list[float]] = {method: [] for method in methods}
    with tempfile.TemporaryDirectory() as tmp:
        root = link_shared_sample(NIH_SHARED, Path(tmp) / "nih")
        for round_number in range(rounds):
            for method, job in methods.items():
                start = time.perf_counter()
                job(round_number)
                seconds[method].append(time.perf_counter() - start)
    best = {method: round(len(paths) / min(times), 1) for method, times in seconds.items()}
    medians = {method: round(len(paths) / median(times, 6), 1) for method, times in seconds.items()}
    return {
        "date": dt.date.today().isoformat(),
        "cpu": cpu_model(),
        "cores_used": 1,
        "images": len(paths),
        "source": "NIH ChestX-ray14 sample, 1024x1024 PNG (97 L, 3 RGBA)",
        "size": size,
        "rounds": rounds,
        "images_per_s_per_core": best,
        "median_images_per_s_per_core": medians,
        "prepare_vs_pil": round(best["prepare_workers_1"] / best["plain_pil"], 2),
        "load_xray_vs_pil": round(best["load_xray"] / best["plain_pil"], 2),
        "prepare_vs_pil_medians": round(medians["prepare_workers_1"] / medians["plain_pil"], 2),
        "target": TARGET,
        "versions": versions(cv2, PIL, np),
    }


def _markdown(r: dict) -> str:
    best, med = r["images_per_s_per_core"], r["median_images_per_s_per_core"]
    rows = [[name, best[name], f"{best[name] / best['plain_pil']:.2f}x", med[name],
             f"{med[name] / med['plain_pil']:.2f}x"] for name in best]  # fmt: skip
    header = ["method", "best images/s per core", "vs plain PIL", "median images/s", "vs plain PIL"]
    met = "met" if r["prepare_vs_pil"] >= r["target"] else "NOT met"
    return markdown(
        f"Prepare throughput per core, {r['date']}",
        [
            f"Machine: {r['cpu']}; one core per method. Data: {r['source']}, to {r['size']} px uint8;"
            f" {r['rounds']} rounds in rotation. Command: `python {' '.join(sys.argv)}`.",
            "",
            *table(header, rows),
            "",
            f"Target prepare >= {r['target']}x plain PIL (best rounds): **{met}** ({r['prepare_vs_pil']}x;"
            f" medians {r['prepare_vs_pil_medians']}x).",
        ],
        r,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        size = int(compose_config(["data=nih"], tmp).data.image_size)
    result = run(args.rounds, size)
    text = _markdown(result)
    print(text)
    write(args.out / f"prepare_throughput_{result['date']}.md", text)


if __name__ == "__main__":
    main()
