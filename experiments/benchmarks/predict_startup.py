"""Wall seconds of `xraycls predict` on one PNG, a fresh process each time, for one or more source trees.

Start-up is what a user waits for on one image: nearly all of it is imports. Each tree (``--tree
name=path``, default: this checkout as ``after``) exports its own tiny bundle (timm `test_vit`, 64 px: the
weights load in milliseconds, so the time is the code's) and predicts one 256 px PNG with
``python -m xraycls predict --device cpu --quiet --out``, its PYTHONPATH set to the tree. Repeats are
interleaved (tree order alternates) so drift on a shared machine hits every tree alike; the 1-minute load
average is read before and after each call. One more call per tree lists the heavy packages it loaded.

Writes ``experiments/results/predict_startup_<date>.md``.

    python experiments/benchmarks/predict_startup.py --tree before=/path/to/old/checkout --repeats 7
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import PROJECT_ROOT, RESULTS, machine, write

HEAVY = ("torch", "timm", "torchvision", "lightning", "torchmetrics", "hydra", "omegaconf", "transformers",
         "albumentations", "pandas", "matplotlib", "scipy", "sklearn", "onnx", "onnxruntime")  # fmt: skip
_MAKE = """
import sys
from pathlib import Path
import numpy as np, cv2
from xraycls.findings import NUM_LABELS
from xraycls.inference.bundle import export_bundle, make_preprocessing
from xraycls.model.backbone import create_backbone
out = Path(sys.argv[1])
kwargs = {"num_classes": NUM_LABELS, "img_size": 64, "patch_size": 16, "global_pool": "avg"}
model = create_backbone("test_vit", weights="none", **kwargs).eval()
export_bundle(model, out / "model", backbone_name="test_vit", backbone_kwargs=kwargs,
              preprocessing=make_preprocessing(image_size=64, input_size=64))
cv2.imwrite(str(out / "x.png"), np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8))
"""
_LOADED = "import runpy, sys; sys.argv = ['xraycls', *sys.argv[1:]]\ntry:\n    runpy.run_module('xraycls', "
_LOADED += (
    "run_name='__main__')\nexcept SystemExit:\n    pass\nprint('LOADED', sorted(m for m in {heavy!r} if m in "
)
_LOADED += "sys.modules), file=sys.stderr)\n"


def _env(tree: Path) -> dict[str, str]:
    # Run in a folder without the package: `python -m` / `-c` put the working directory before PYTHONPATH.
    return {**os.environ, "PYTHONPATH": str(tree)}


def _predict_args(work: Path) -> list[str]:
    return ["predict", "--model", str(work / "model"), str(work / "x.png"), "--out", str(work / "p.csv"),
            "--device", "cpu", "--quiet"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", default=[], help="name=path of a source tree (repeatable)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    trees = dict(item.split("=", 1) for item in args.tree) or {"after": str(PROJECT_ROOT)}
    load_before = os.getloadavg()
    readings: dict[str, list[dict]] = {name: [] for name in trees}
    loaded: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        works = {}
        for name, tree in trees.items():
            works[name] = Path(tmp) / name
            works[name].mkdir()
            command = [sys.executable, "-c", _MAKE, str(works[name])]
            subprocess.run(command, cwd=works[name], env=_env(Path(tree)), check=True)
        names = list(trees)
        for repeat in range(args.repeats):
            for name in names if repeat % 2 == 0 else names[::-1]:
                before = os.getloadavg()[0]
                start = time.perf_counter()
                command = [sys.executable, "-m", "xraycls", *_predict_args(works[name])]
                subprocess.run(
                    command, cwd=works[name], env=_env(Path(trees[name])), check=True, capture_output=True
                )
                seconds = time.perf_counter() - start
                readings[name].append(
                    {
                        "seconds": round(seconds, 3),
                        "load_1min": [round(before, 2), round(os.getloadavg()[0], 2)],
                    }
                )
                print(f"{name} #{repeat}: {seconds:.2f} s")
        for name, tree in trees.items():
            code = _LOADED.format(heavy=HEAVY)
            command = [sys.executable, "-c", code, *_predict_args(works[name])]
            done = subprocess.run(
                command, cwd=works[name], env=_env(Path(tree)), capture_output=True, text=True, check=True
            )
            line = [row for row in done.stderr.splitlines() if row.startswith("LOADED ")][-1]
            loaded[name] = json.loads(line.removeprefix("LOADED ").replace("'", '"'))
    stats = {}
    for name, rows in readings.items():
        values = [row["seconds"] for row in rows]
        stats[name] = {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values)}
    date = dt.date.today().isoformat()
    first = names[0]
    lines = [
        f"# `xraycls predict` on one PNG: start-up ({date})",
        "",
        "Wall seconds of a fresh `python -m xraycls predict --device cpu` on one 256 px PNG with a tiny",
        f"bundle, {args.repeats} interleaved repeats per tree (experiments/benchmarks/predict_startup.py).",
        "",
        f"| tree | median s | range s | ratio to {first} (median) | heavy packages loaded |",
        "|---|---|---|---|---|",
    ]
    for name, row in stats.items():
        # Paired: each repeat's reading over the first tree's reading of the same repeat (adjacent in time).
        paired = zip(readings[name], readings[first], strict=True)
        pairs = [mine["seconds"] / theirs["seconds"] for mine, theirs in paired]
        row["paired_ratio_median"] = statistics.median(pairs)
        row["paired_ratio_range"] = [min(pairs), max(pairs)]
        lines.append(
            f"| {name} | {row['median_s']:.2f} | {row['min_s']:.2f}-{row['max_s']:.2f} | "
            f"{row['median_s'] / stats[first]['median_s']:.2f}x (paired {row['paired_ratio_median']:.2f}x, "
            f"{min(pairs):.2f}-{max(pairs):.2f}) | {', '.join(loaded[name])} |"
        )
    info = {"date": date, "trees": trees, "note": args.note, "machine": machine(load_before)}
    body = json.dumps({"info": info, "stats": stats, "readings": readings, "loaded": loaded}, indent=2)
    lines += ["", "```json", body, "```", ""]
    print("\n".join(lines[: 10 + len(stats)]))
    write(args.out or RESULTS / f"predict_startup_{date}.md", "\n".join(lines))


if __name__ == "__main__":
    main()
