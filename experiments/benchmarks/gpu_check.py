"""The steps of `gpu_check.sh`: one GPU's measured numbers for the ViT-B/16 path, in one result file.

`modules` names, in one line, every module the check imports that is missing (exit 3). `run` then:

1. data: `xraycls synth` + `xraycls prepare`: a synthetic NIH tree and its uint8 cache in the work folder;
2. throughput: `train_throughput.py` in one process: the cache-fed Lightning path (workers, augmentation,
   device normalisation) against a bare timm + `torch.compile` loop on on-device batches, train and eval;
3. short run: `run_training` (the real config, ViT-B/16, bf16, compiled) on that cache, a few batches: the
   compile fixed cost (`timing.compile`), peak GPU memory, and the exported `model/` bundle;
4. predict: `xraycls predict --device cuda` on the synthetic PNGs, timed at two sizes (the difference gives
   images/s without the start-up);
5. the result: `experiments/results/gpu_<card>_<date>.md` (every number measured in this run).

Weights are `model.weights=none` (random init): the check runs with no network, and neither throughput nor
memory depend on the weights' values; no accuracy is measured. `--dry-run` runs every step on the CPU with
a tiny model and writes to a temporary path marked DRY RUN, never under experiments/results/. Without
`--dry-run` and without CUDA it refuses (exit 2) before writing anything.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROJECT_ROOT = HERE.parents[1]
RESULTS = PROJECT_ROOT / "experiments" / "results"
# What the check imports (import names), and setuptools to build the package without the network; the
# optional integrations (wandb, optuna, onnx, transformers) are not used.
REQUIRED_MODULES = (
    "torch", "lightning", "timm", "torchmetrics", "hydra", "omegaconf", "albumentations", "cv2", "numpy",
    "pandas", "PIL", "matplotlib", "tqdm", "safetensors", "sklearn", "psutil", "yaml", "setuptools",
)  # fmt: skip
DRY_BANNER = (
    "DRY RUN: CPU, tiny model, a few steps. It checks the steps; no number here is a GPU measurement."
)
SETTINGS = {
    "gpu": {
        "synth_images": 6000, "synth_size": 64, "cache_size": 256, "input_size": 224, "batch_size": 256,
        "train_batches": 20, "eval_batches": 4, "predict_images": (500, 6000), "predict_batch": 64,
        "overrides": ["model=vit_b16", "model.compile=true", "hardware=gpu"],
        "throughput": ["--accelerator", "gpu"],
    },
    "dry": {
        "synth_images": 96, "synth_size": 32, "cache_size": 64, "input_size": 64, "batch_size": 8,
        "train_batches": 3, "eval_batches": 2, "predict_images": (4, 12), "predict_batch": 4,
        "overrides": ["model=vit_tiny", "hardware=cpu", "callbacks.run_timer.warmup_batches=1"],
        "throughput": ["--accelerator", "cpu", "--steps", "2", "--warmup-steps", "1", "--repeats", "1",
                       "data.batch_size=4"],
    },
}  # fmt: skip


def missing_modules() -> list[str]:
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


def card_name() -> str:
    """`nvidia-smi`'s name of GPU 0, else torch's."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except OSError:
        pass
    import torch

    return torch.cuda.get_device_name(0)


def result_path(card: str, date: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "_", card.lower()).strip("_") or "gpu"
    return RESULTS / f"gpu_{slug}_{date}.md"


def _xraycls(*args: str) -> list[str]:
    """The installed console script when on PATH (what a user runs), else `python -m xraycls`."""
    script = shutil.which("xraycls")
    return [script, *args] if script else [sys.executable, "-m", "xraycls", *args]


def _timed(command: list[str]) -> float:
    print("+", " ".join(command[:8]) + (" ..." if len(command) > 8 else ""), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=PROJECT_ROOT)
    return time.perf_counter() - start


def step_data(work: Path, s: dict) -> dict:
    raw, cache = work / "raw", work / "cache"
    synth = _timed(
        _xraycls("synth", "--out", str(raw), "--n", str(s["synth_images"]), "--size", str(s["synth_size"]),
                 "--min-prevalence", "0.1")
    )  # fmt: skip
    prepare = _timed(_xraycls("prepare", "--root", str(raw), "--cache", str(cache), "--size",
                              str(s["cache_size"]), "--quiet"))  # fmt: skip
    return {
        "images": s["synth_images"],
        "cache_size": s["cache_size"],
        "synth_s": synth,
        "prepare_s": prepare,
    }


def step_throughput(work: Path, s: dict) -> dict:
    out = work / "train_throughput.md"
    command = [sys.executable, str(HERE / "train_throughput.py"), *s["throughput"], "--out", str(out),
               "--note", "gpu_check.sh; model.weights=none (offline)"]  # fmt: skip
    seconds = _timed(command)
    blocks = re.findall(r"```json\n(.*?)\n```", out.read_text(), flags=re.DOTALL)
    report = json.loads(blocks[-1])
    table = {
        name: {kind: report["results"][name][kind] for kind in ("train", "eval")}
        for name in ("bare", "lightning_cache")
    }
    keys = ("cache_vs_bare_train", "cache_vs_bare_eval", "gpu_targets", "gpu_targets_met")
    return {
        "seconds": seconds,
        "results": table,
        "checks": {key: report["checks"][key] for key in keys},
        "setting": report["setting"],
        "machine": report["machine"],
        "versions": report["versions"],
        "dynamo": report.get("dynamo"),
    }


def step_short_run(work: Path, s: dict, cuda: bool) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from _common import compose_config

    from xraycls.training.run import run_training

    overrides = [
        *s["overrides"], "model.weights=none",
        f"data.root={work / 'raw'}", f"data.cache_dir={work / 'cache'}",
        f"data.image_size={s['cache_size']}", f"data.input_size={s['input_size']}",
        f"data.batch_size={s['batch_size']}", f"data.num_workers={min(8, len(os.sched_getaffinity(0)))}",
        "data.split=official", "trainer.max_epochs=1", f"trainer.limit_train_batches={s['train_batches']}",
        f"trainer.limit_val_batches={s['eval_batches']}", f"trainer.limit_test_batches={s['eval_batches']}",
        "trainer.enable_progress_bar=false", "plots=false", "logger=csv", "task_name=gpu_check",
        f"paths.runs_dir={work / 'runs'}",
    ]  # fmt: skip
    cfg = compose_config(overrides, work / "run")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    summary = run_training(cfg)
    seconds = time.perf_counter() - start
    peak = (
        {
            "allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        }
        if cuda
        else None
    )
    return {
        "seconds": seconds,
        "overrides": overrides,
        "compile_s": summary["timing"].get("compile"),
        "timing": {
            key: summary["timing"].get(key) for key in ("setup", "compile", "train", "validate", "test")
        },
        "throughput": summary.get("throughput"),
        "hardware": summary.get("hardware"),
        "peak_memory": peak,
        "bundle": str(work / "run" / "model"),
    }


def step_predict(work: Path, bundle: str, s: dict, device: str) -> dict:
    images = sorted((work / "raw" / "images").glob("*.png"))
    runs = []
    for n in s["predict_images"]:
        out = work / f"predictions_{n}.csv"
        command = _xraycls("predict", *map(str, images[:n]), "--model", bundle, "--device", device,
                           "--out", str(out), "--quiet", "--batch-size", str(s["predict_batch"]),
                           "--workers", str(min(8, len(os.sched_getaffinity(0)))))  # fmt: skip
        seconds = _timed(command)
        rows = sum(1 for line in out.read_text().splitlines() if not line.startswith("#")) - 1  # the header
        runs.append({"images": n, "rows": rows, "seconds": seconds, "images_per_s": n / seconds})
    (small, large) = runs
    extra = large["seconds"] - small["seconds"]
    # None when start-up noise swamps the extra images' time (the dry run's few images).
    marginal = (large["images"] - small["images"]) / extra if extra > 0.1 * large["seconds"] else None
    return {"device": device, "runs": runs, "marginal_images_per_s": marginal}


def _f(value: Any, pattern: str = "{:,.1f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def render(report: dict) -> str:
    dry, tp, run, pred = report["dry_run"], report["throughput"], report["short_run"], report["predict"]
    lines = [f"# GPU check: {report['card']}, {report['date']}", ""]
    if dry:
        lines += [f"**{DRY_BANNER}**", ""]
    lines += [
        "## Setting",
        "",
        f"- card: {report['card']}; torch {report['torch']}, CUDA {report['cuda']}",
        f"- command: `{report['command']}`",
        "- weights: `model.weights=none` (random init): the check runs offline, and throughput and memory do "
        "not depend on the weights' values; no accuracy is measured here",
        f"- data: `xraycls synth` ({report['data']['images']:,} images) + `xraycls prepare` "
        f"({report['data']['cache_size']} px uint8 cache); the throughput step builds its own the same way",
        f"- throughput setting: `{json.dumps(tp['setting']['overrides'])}`",
        "",
        "## Throughput: cache-fed Lightning vs bare timm + torch.compile (same process)",
        "",
        *(["Dry run: the tiny ViT on the CPU, not compiled.", ""] if dry else []),
        "| path | train images/s | vs bare | eval images/s | vs bare |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, block in tp["results"].items():
        train, evaluate = block["train"], block["eval"]
        lines.append(
            f"| {name} | {_f(train['images_per_s'])} | {_f(train.get('vs_bare'), '{:.3f}')} "
            f"| {_f(evaluate['images_per_s'])} | {_f(evaluate.get('vs_bare'), '{:.3f}')} |"
        )
    checks = tp["checks"]
    targets = checks["gpu_targets"]
    lines += [
        "",
        f"Targets: train >= {targets['train']}x, eval >= {targets['eval']}x of the bare loop; "
        f"met: {checks['gpu_targets_met'] if not dry else 'n/a (dry run)'}.",
        "",
        "## Compile fixed cost",
        "",
        f"- `timing.compile` of the short run: {_f(run['compile_s'], '{:.1f} s')} (the first training batch "
        "minus the mean batch after warm-up: an upper bound, see xraycls/training/timing.py)"
        + (" (not compiled in the dry run)" if dry else ""),
        f"- short run: {_f(run['seconds'], '{:.1f} s')} in all; train images/s "
        f"{_f((run['throughput'] or {}).get('train_images_per_s'))}",
        "",
        f"## xraycls predict --device {pred['device']}",
        "",
        "| images | seconds (whole command) | images/s |",
        "| ---: | ---: | ---: |",
        *[f"| {r['images']} | {r['seconds']:.1f} | {r['images_per_s']:.1f} |" for r in pred["runs"]],
        "",
        f"Without start-up (difference of the two runs): {_f(pred['marginal_images_per_s'])} images/s. "
        f"The files are {report['settings']['synth_size']} px synthetic PNGs, far cheaper to decode than"
        " NIH's 1024 px ones: this is the model side's rate, not a rate on real files.",
        "",
        "## Peak GPU memory",
        "",
    ]
    peak = run["peak_memory"]
    lines.append(
        "n/a (no CUDA in the dry run)"
        if peak is None
        else f"Short training run (batch {report['settings']['batch_size']}): "
        f"{peak['allocated_gib']:.2f} GiB allocated, {peak['reserved_gib']:.2f} GiB reserved "
        "(torch.cuda.max_memory_allocated / max_memory_reserved)."
    )
    lines += [
        "",
        "## Raw results (JSON)",
        "",
        "```json",
        json.dumps(report, indent=2, default=str),
        "```",
        "",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    cuda = torch.cuda.is_available()
    if not args.dry_run and not cuda:
        print("gpu_check: torch sees no CUDA device; nothing measured, nothing written", file=sys.stderr)
        return 2
    date = dt.date.today().isoformat()
    card = "CPU (dry run)" if args.dry_run else card_name()
    if args.dry_run:
        out = args.out or Path(tempfile.gettempdir()) / f"gpu_check_DRY_RUN_{date}.md"
        if out.resolve().is_relative_to(RESULTS.resolve()):
            print(f"gpu_check: a dry run never writes under {RESULTS}", file=sys.stderr)
            return 2
    else:
        out = args.out or result_path(card, date)
    s = SETTINGS["dry" if args.dry_run else "gpu"]
    work = args.workdir
    started = time.perf_counter()
    data = step_data(work, s)
    throughput = step_throughput(work, s)
    short = step_short_run(work, s, cuda and not args.dry_run)
    predict = step_predict(work, short["bundle"], s, "cpu" if args.dry_run else "cuda")
    report = {
        "dry_run": args.dry_run,
        "card": card,
        "date": date,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "command": "experiments/benchmarks/gpu_check.sh" + (" --dry-run" if args.dry_run else ""),
        "settings": {key: value for key, value in s.items() if key not in ("overrides", "throughput")},
        "data": data,
        "throughput": throughput,
        "short_run": short,
        "predict": predict,
        "total_seconds": time.perf_counter() - started,
    }
    from xraycls.files import write_text

    write_text(out, render(report))
    print(f"gpu_check: wrote {out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("modules", help="name the missing modules in one line (exit 3), else say nothing")
    p = sub.add_parser("run", help="every step, then the result file")
    p.add_argument("--workdir", type=Path, required=True, help="an empty scratch folder")
    p.add_argument("--out", type=Path, default=None, help="result file (default: see the module doc)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny settings, a temporary DRY RUN result")
    args = parser.parse_args()
    if args.command == "modules":
        missing = missing_modules()
        if missing:
            print(f"gpu_check: missing modules: {', '.join(missing)}", file=sys.stderr)
            return 3
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
