"""Prepare throughput per core on the real NIH sample (100 PNGs, 1024 x 1024) against a plain PIL loop.

Both sides do the same job, file -> 8-bit gray S x S array (S = the config's `data.image_size`, 256), one
core each, in the same run:

- plain PIL: `Image.open(path).convert("L").resize((S, S), Image.BOX)` (area averaging) -> numpy;
- `load_xray`: the project's decoding rule alone (OpenCV, INTER_AREA);
- `prepare_cache(workers=1)`: the whole `xraycls prepare` (label parsing, chunk files, assembly included).

Files are read once first so that every timing comes from the page cache. Each method runs `--rounds`
times in rotation; the best round counts (least disturbed by other work on a shared machine), the
median is reported too. OpenCV is held to one thread so that "per core" means one core.
Target: prepare >= 1.2x plain PIL.

Run: `python experiments/benchmarks/prepare_throughput.py [--rounds 15] [--out experiments/results]`.
Writes `prepare_throughput_<date>.md` (table, machine, JSON) into `--out`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import PIL
from _common import PROJECT_ROOT, RESULTS, compose_config, cpu_model, versions, write
from _nih_sample import link_shared_sample
from PIL import Image

from xraycls.data.cache import prepare_cache
from xraycls.data.images import load_xray

NIH_SHARED = PROJECT_ROOT.parent / "shared" / "nih"
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
    rates = {method: round(len(paths) / min(times), 1) for method, times in seconds.items()}
    medians = {method: round(len(paths) / float(np.median(times)), 1) for method, times in seconds.items()}
    return {
        "date": dt.date.today().isoformat(),
        "cpu": cpu_model(),
        "cores_used": 1,
        "images": len(paths),
        "source": "NIH ChestX-ray14 sample, 1024x1024 PNG (97 L, 3 RGBA)",
        "size": size,
        "rounds": rounds,
        "images_per_s_per_core": rates,
        "median_images_per_s_per_core": medians,
        "prepare_vs_pil": round(rates["prepare_workers_1"] / rates["plain_pil"], 2),
        "load_xray_vs_pil": round(rates["load_xray"] / rates["plain_pil"], 2),
        "prepare_vs_pil_medians": round(medians["prepare_workers_1"] / medians["plain_pil"], 2),
        "target": TARGET,
        "versions": versions(cv2, PIL, np),
    }


def _markdown(result: dict) -> str:
    best, median = result["images_per_s_per_core"], result["median_images_per_s_per_core"]
    met = "met" if result["prepare_vs_pil"] >= result["target"] else "NOT met"
    rows = "\n".join(
        f"| {name} | {best[name]:.1f} | {best[name] / best['plain_pil']:.2f}x "
        f"| {median[name]:.1f} | {median[name] / median['plain_pil']:.2f}x |"
        for name in best
    )
    return (
        f"# Prepare throughput per core, {result['date']}\n\n"
        f"Machine: {result['cpu']} (`lscpu` model name; a 2-core VM shared with other work), one core per\n"
        f"method, OpenCV held to 1 thread. Data: {result['source']}, to {result['size']}x{result['size']}\n"
        f"uint8; {result['rounds']} rounds in rotation. Command: "
        "`python experiments/benchmarks/prepare_throughput.py`.\n\n"
        "| method | best images/s per core | vs plain PIL | median images/s | vs plain PIL |\n"
        "| --- | --- | --- | --- | --- |\n"
        f"{rows}\n\n"
        f"Target prepare >= {result['target']}x plain PIL (best rounds): **{met}** "
        f"({result['prepare_vs_pil']}x; medians {result['prepare_vs_pil_medians']}x).\n\n"
        f"```json\n{json.dumps(result, indent=2)}\n```\n"
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
