"""Train and eval images/s of the project's Lightning loop against a bare PyTorch loop, in one run.

Every loop comes from the project's Hydra config (conf/, the preset's overrides, then the command line's)
and is measured after warm-up in one process, repeats interleaved (the order rotates each repeat, so drift
from other work on a shared machine hits every loop alike); `_train_loops.py` builds them:

- ``bare``: the config's backbone, AdamW + warm-up cosine, autocast for bf16, batches already on the device;
- ``lightning_synthetic``: the config's module and Trainer (its callbacks and logger), the same batches;
- ``lightning_cache``: the same, fed from a synthetic uint8 cache through the config's DataModule;
- with ``--ablations``, ``lightning_synthetic`` without each piece: ``_no_progress_bar``, ``_no_logger``,
  ``_no_run_timer`` (config overrides), ``_no_host_metrics`` (a module subclass without its per-batch host
  work, for comparison only), and without all four (``_lean``).

Checks: on the CPU the Lightning loop on synthetic batches takes <= 1.10x the time per training step of the
bare loop (ratio of median images/s), also in CPU time of this process and work-normalised ((1 + overhead)
/ (1 + the bare loop's), overhead = step CPU / CPU of the work both share - 1); on a GPU the cache-fed loop
reaches >= 0.98x the bare loop's train and >= 0.95x its eval images/s. Without compile, also the tensor ->
Python reads per step by caller. Writes ``experiments/results/train_throughput_<accelerator>_<date>.md``.

    python experiments/benchmarks/train_throughput.py --ablations            # CPU, the demo's tiny ViT
    python experiments/benchmarks/train_throughput.py --accelerator gpu      # ViT-B/16, 224, bf16, compiled
    python experiments/benchmarks/train_throughput.py --steps 4 --repeats 1 data.batch_size=8   # overrides
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import lightning
import timm
import torch
import torchmetrics
from _common import RESULTS, compose_config, fmt, machine, markdown, median, table, versions, write
from _train_loops import BareLoop, DeviceBatches, LightningLoop, Run, Window, make_module
from _train_probes import probe
from torch._dynamo.utils import counters

from xraycls.data.cache import prepare_cache
from xraycls.data.synthetic import make_synthetic_nih
from xraycls.training.config import instantiate

LOOP_OVERHEAD_TARGET = 1.10  # Lightning time per step / bare time per step, CPU, tiny ViT
GPU_TARGETS = {"train": 0.98, "eval": 0.95}  # cache-fed Lightning images/s / bare images/s
_BASE = ["model.weights=none", "data.split=seed_random"]
PRESETS = {  # config overrides and loop sizes per accelerator; the command line overrides both
    "cpu": dict(
        overrides=[*_BASE, "model=vit_tiny", "hardware=cpu", "data.image_size=64", "data.input_size=64",
                   "data.batch_size=16", "data.num_workers=1"],
        warmup_steps=5, steps=40, repeats=7, threads=1,
    ),
    "gpu": dict(
        overrides=[*_BASE, "model=vit_b16", "hardware=gpu", "model.compile=true", "data.batch_size=256",
                   f"data.num_workers={max(0, min(len(os.sched_getaffinity(0)) - 2, 10))}"],
        warmup_steps=10, steps=30, repeats=3, threads=None,
    ),
}  # fmt: skip
_PIECES = {"progress_bar": "trainer.enable_progress_bar=false", "logger": "~logger"}
_PIECES["run_timer"] = "~callbacks.run_timer"
_CLOCKS = ("seconds", "cpu_seconds")  # Window fields: wall, CPU time of this process
ABLATIONS = {  # name: (config overrides, the module's per-batch host work kept)
    **{f"no_{piece}": ([override], True) for piece, override in _PIECES.items()},
    "no_host_metrics": ([], False),
    "lean": (list(_PIECES.values()), False),
}


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/ (e.g. data.batch_size=32)")
    parser.add_argument("--accelerator", choices=sorted(PRESETS), default="cpu")
    for key in list(PRESETS["cpu"])[1:]:  # loop sizes (>= 1), torch threads; default: the preset's
        parser.add_argument("--" + key.replace("_", "-"), type=int)
    parser.add_argument("--ablations", action="store_true", help="also the Lightning loop without each piece")
    parser.add_argument("--out", type=Path, help="result file (default experiments/results/...md)")
    parser.add_argument("--note", default="", help="free text stored with the result")
    args = parser.parse_args()
    for key, value in PRESETS[args.accelerator].items():
        if key == "overrides":
            args.overrides = [*value, *args.overrides]
        elif getattr(args, key) is None:
            setattr(args, key, value)
        if key not in ("overrides", "threads") and getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("--accelerator gpu: torch sees no CUDA device on this machine")
    return args


def _cache_datamodule(base: Path, run: Run, cores: int) -> tuple:
    """A synthetic NIH tree and its cache holding a whole train and a whole eval run (seed_random split,
    exact sizes), and the config's DataModule over it."""
    batch, size = int(run.cfg.data.batch_size), int(run.cfg.data.image_size)
    n = 2 * (run.total + 1) * batch
    workers = cores if n > 4000 else 1  # spawned pool processes re-import torch: worth it for big sets only
    # PNGs at <= 64 px (fast to render); prepare resizes them to the cache side like any NIH image.
    make_synthetic_nih(base / "raw", n, size=min(size, 64), seed=run.seed, workers=workers)
    prepare_cache(base / "raw", base / "cache", size=size, workers=workers, progress=False)
    datamodule = instantiate(run.cfg.data, cache_dir=str(base / "cache"), val_fraction=0.5, seed=run.seed)
    datamodule.setup("fit")
    return datamodule, {"images": n, "cache_size": size}


def _measure(loops: dict, repeats: int) -> dict[str, dict[str, list[Window]]]:
    """Every loop trains, then every loop evaluates, `repeats` times; the order rotates each repeat."""
    windows: dict = {name: {"train": [], "eval": []} for name in loops}
    names = list(loops)
    for repeat in range(repeats):
        for kind in ("train", "eval"):
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                loop, data = loops[name]
                windows[name][kind].append(window := loop(kind, data))
                rate = window.images / window.seconds
                print(f"repeat {repeat} {kind:5s} {name:36s} {rate:10.1f} images/s", flush=True)
                gc.collect()  # old Trainers hold DataLoader workers and device memory through cycles
    return windows


def _summary(windows: list[Window], bare: list[Window]) -> dict:
    """Medians over the repeats of images/s (wall, CPU time of this process, RunTimer's reading) and the
    ratios of the medians to the bare loop's."""
    wall, cpu = ([[w.images / getattr(w, key) for w in ws] for ws in (windows, bare)] for key in _CLOCKS)
    summary = {
        "images_per_s": median(wall[0], 1),
        "repeats": [round(r, 1) for r in wall[0]],
        "cpu_time_images_per_s": median(cpu[0], 1),
        "run_timer_images_per_s": median((w.run_timer_images_per_s for w in windows), 1),
    }
    if windows is not bare:
        summary["vs_bare"] = round(median(wall[0], 9) / median(wall[1], 9), 4)
        summary["cpu_time_vs_bare"] = round(median(cpu[0], 9) / median(cpu[1], 9), 4)
    return summary


def _checks(results: dict, on_gpu: bool, probes: dict | None) -> dict:
    synthetic, cache = results["lightning_synthetic"]["train"], results["lightning_cache"]
    overheads = {name: probe["train"]["overhead"] for name, probe in (probes or {}).items()}
    base = overheads.pop("bare", None)
    met = (
        cache["train"]["vs_bare"] >= GPU_TARGETS["train"] and cache["eval"]["vs_bare"] >= GPU_TARGETS["eval"]
    )
    return {
        "loop_overhead_time_ratio": round(1 / synthetic["vs_bare"], 4),
        "loop_overhead_target": LOOP_OVERHEAD_TARGET,
        "loop_overhead_met": 1 / synthetic["vs_bare"] <= LOOP_OVERHEAD_TARGET,
        # The same ratio in CPU seconds of this process: blind to time lost to other work on the machine.
        "loop_overhead_cpu_time_ratio": round(1 / synthetic["cpu_time_vs_bare"], 4),
        # (1 + overhead) / (1 + the bare loop's overhead), each step / its own work, from the probe runs.
        "loop_overhead_work_normalised": {
            name: round((1 + value) / (1 + base), 4) for name, value in overheads.items() if base is not None
        },
        "cache_vs_bare_train": cache["train"]["vs_bare"],
        "cache_vs_bare_eval": cache["eval"]["vs_bare"],
        "gpu_targets": GPU_TARGETS,
        "gpu_targets_met": met if on_gpu else None,
    }


def _table(report: dict) -> list[str]:
    """One row per loop: images/s, the ratios to the bare loop, the probes; columns that have a value."""
    probes = report["probes"] or {}

    def cells(name: str, kind: str) -> dict[str, str]:
        result, probe = report["results"][name][kind], probes.get(name, {}).get(kind)
        reads = probe and (", ".join(f"{k} {v:g}" for k, v in probe["reads"].items()) or "none")
        return {
            f"{kind} images/s": fmt(result["images_per_s"]),
            f"{kind} vs bare": fmt(result.get("vs_bare"), "{:.3f}x"),
            f"{kind} vs bare, CPU time": fmt(result.get("cpu_time_vs_bare"), "{:.3f}x"),
            f"{kind} overhead": fmt(probe and probe["overhead"], "{:+.1%}"),
            f"{kind} scalar reads per step": reads or "n/a",
        }

    grid = {name: cells(name, "train") | cells(name, "eval") for name in report["results"]}
    header = [key for key in grid["bare"] if any(row[key] != "n/a" for row in grid.values())]
    return table(["loop", *header], ([name, *(row[key] for key in header)] for name, row in grid.items()))


def _markdown(report: dict) -> str:
    s, m, c = report["setting"], report["machine"], report["checks"]
    normalised = ", ".join(f"{k} {v:.3f}x" for k, v in c["loop_overhead_work_normalised"].items())
    return markdown(
        f"Training throughput, {s['accelerator']}, {report['date'][:10]}",
        [
            f"Machine: {m['cpu_model']}, {m['cores_available']} cores (shared with other work), device"
            f" {m['device']}; load average before {m['load_average_1_5_15_before']}, after"
            f" {m['load_average_1_5_15_after']}. Setting: {s['backbone']} at {s['input_size']} px, batch"
            f" {s['batch_size']}, {s['precision']}, compile {s['compile']}; {s['warmup']} warm-up batches and"
            f" {s['total'] - s['warmup']} measured per run, medians of {s['repeats']} interleaved repeats."
            " Overhead (CPU time per step / CPU time of the work both loops share - 1) and scalar reads"
            f" come from one more run each (eager only). Command: `{report['command']}`",
            "",
            *_table(report),
            "",
            "Loop overhead, time per training step of lightning_synthetic / bare:"
            f" {c['loop_overhead_time_ratio']:.3f}x (target <= {c['loop_overhead_target']:.2f}x):"
            f" **{'met' if c['loop_overhead_met'] else 'NOT met'}**; in CPU time of this process"
            f" {c['loop_overhead_cpu_time_ratio']:.3f}x; work-normalised: {normalised or 'n/a'}.",
            f"GPU targets, lightning_cache / bare: train {c['cache_vs_bare_train']:.3f}x (>= 0.98), eval"
            f" {c['cache_vs_bare_eval']:.3f}x (>= 0.95): **{'met' if c['gpu_targets_met'] else 'NOT met'}**."
            if s["accelerator"] == "gpu"
            else "**No GPU number was measured**: this run used the CPU, where the GPU targets do not apply.",
        ],
        report,
    )


def _quiet() -> None:
    for logger in ("lightning.pytorch", "lightning.fabric"):  # "GPU available: ...", tips, per Trainer
        logging.getLogger(logger).setLevel(logging.WARNING)
    # Short runs on random labels leave labels without positives: the per-epoch AUROC warning is expected.
    logging.getLogger("xraycls.model.metrics").setLevel(logging.ERROR)
    for message in (
        "many workers",
        "smaller than the logging",
        "is not empty",
        "no `val_dataloader`",
        "LeafSpec",
    ):
        warnings.filterwarnings("ignore", message=f".*{message}.*")


def main() -> None:
    args = _parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    _quiet()
    with tempfile.TemporaryDirectory(prefix="xraycls-train-bench-") as tmp:
        workdir = Path(tmp) / "logs"
        cfg = compose_config(args.overrides, workdir)
        run = Run(cfg, args.warmup_steps, args.warmup_steps + args.steps)
        setting = {
            **{key: cfg.model[key] for key in ("backbone", "compile")},
            **{key: run.hardware[key] for key in ("accelerator", "precision")},
            **{key: int(cfg.data[key]) for key in ("batch_size", "input_size")},
            **{key: getattr(run, key) for key in ("warmup", "total", "seed")},
            **{key: getattr(args, key) for key in ("repeats", "overrides")},
        }
        datamodule, setting["data"] = _cache_datamodule(Path(tmp), run, len(os.sched_getaffinity(0)))
        batches, modules = DeviceBatches(run), {True: make_module(run)}  # a compiled backbone compiles once
        loops = {"bare": (BareLoop(run), batches)}
        variants = {"": ([], True), **(ABLATIONS if args.ablations else {})}
        for name, (overrides, host_metrics) in variants.items():
            if host_metrics not in modules:
                modules[host_metrics] = make_module(run, host_metrics=False)
            label = "lightning_synthetic" + (name and f"_{name}")
            loop_cfg = compose_config([*args.overrides, *overrides], workdir)
            loops[label] = (LightningLoop(run, loop_cfg, label, modules[host_metrics], workdir), batches)
        cache_loop = LightningLoop(run, cfg, "lightning_cache", modules[True], workdir)
        loops["lightning_cache"] = (cache_loop, datamodule)
        load_before = os.getloadavg()
        windows = _measure(loops, args.repeats)
        device = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu"
        threads, workers = torch.get_num_threads(), int(cfg.data.num_workers)
        machine_block = machine(load_before, device=device, torch_threads=threads, loader_workers=workers)
        probes = None  # a timer or a dispatch mode cannot watch compiled code
        if not setting["compile"]:
            backbone = type(loops["bare"][0].model)
            probes = {
                name: {kind: probe(loop, kind, data, backbone) for kind in ("train", "eval")}
                for name, (loop, data) in loops.items()
                if name != "lightning_cache"
            }
    results = {
        name: {kind: _summary(ws, windows["bare"][kind]) for kind, ws in kinds.items()}
        for name, kinds in windows.items()
    }
    # torch._dynamo's counters: a loop past the recompile limit would silently run eager and look slow.
    dynamo = {group: dict(values) for group, values in counters.items() if group in ("stats", "recompiles")}
    report = {
        "benchmark": "train_throughput",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "machine": machine_block,
        "versions": versions(torch, lightning, timm, torchmetrics),
        "setting": setting,
        "results": results,
        "checks": _checks(results, run.device.type == "cuda", probes),
        "probes": probes,
        "dynamo": dynamo if cfg.model.compile else None,
        "note": args.note,
    }
    out = args.out or RESULTS / f"train_throughput_{setting['accelerator']}_{dt.date.today()}.md"
    write(out, _markdown(report))


if __name__ == "__main__":
    main()
