"""Train and eval images/s of the project's real training step, against a bare loop, in one run.

Paths (helpers in `_train_paths.py`), all measured after warm-up in the same process, repeats interleaved
(the order rotates every repeat, so drift from other work on a shared machine hits every path alike):

- ``bare``: timm + (optionally) `torch.compile`, AdamW + per-step warm-up cosine, autocast for bf16, on
  synthetic batches already on the device and already normalised;
- ``lightning_synthetic``: `XrayClassifier` + a real `lightning.Trainer` configured as the project's
  defaults (progress bar refreshed every 10 batches, CSV logger every 10 steps, RunTimer), fed the same
  on-device batches;
- ``lightning_cache``: the same, fed from a synthetic uint8 cache (`make_synthetic_nih` + `prepare_cache`
  in a temporary folder) through the real `NIHDataModule` (workers, augmentation, device normalisation);
- with ``--ablations``, `lightning_synthetic` made leaner step by step, as a user may configure it:
  ``..._no_progress_bar``, ``..._lean`` (also no logger, no RunTimer) and ``..._lean_no_host_metrics``
  (also none of the module's per-batch metric updates and logging: a subclass, for comparison only).

Checks: the issue's CPU check, the Lightning loop on synthetic batches taking at most 1.10x the time per
training step of the bare loop (the ratio of the median images/s, also given in CPU time and
work-normalised, see `_hook_costs.py`); on a GPU, the cache-fed project path at >= 0.98x the bare loop's
train images/s and >= 0.95x its eval images/s. Also: model FLOPs per image and MFU where the card's peak
is known (`_train_flops.py`); per step, what each host-side hook costs (`_hook_costs.py`); and, without
compile, how many tensor -> Python value reads (host-device syncs on a GPU) each path makes per step, by
the code that makes them (`_scalar_reads.py`).

Writes ``experiments/results/train_throughput_<accelerator>_<date>.md`` (table, machine, load average, JSON).

    python experiments/benchmarks/train_throughput.py --ablations            # CPU, the demo's tiny ViT
    python experiments/benchmarks/train_throughput.py --accelerator gpu      # ViT-B/16, 224, bf16, compiled
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import logging
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import lightning
import timm
import torch
import torchmetrics
from _hook_costs import step_breakdown
from _machine import cpu_model
from _scalar_reads import ScalarReads
from _train_config import BenchConfig, DeviceBatches, Window, make_device_batches
from _train_data import make_cache, make_datamodules
from _train_flops import count_flops, mfu, peak_tflops, vit_formula_flops
from _train_paths import PROJECT_SETUP, BareLoop, LightningPath, TrainerSetup, make_module
from _train_report import markdown, summarise

from xraycls.model.backbone import DEFAULT_BACKBONE

RESULTS = Path(__file__).resolve().parents[1] / "results"
LOOP_OVERHEAD_TARGET = 1.10  # Lightning time per step / bare time per step, CPU, tiny ViT
GPU_TARGETS = {"train": 0.98, "eval": 0.95}  # cache-fed project images/s / bare images/s
# Per accelerator defaults; every one can be overridden on the command line.
PRESETS = {
    "cpu": dict(
        backbone="test_vit", input_size=64, patch_size=16, global_pool="avg", batch_size=16,
        eval_batch_size=64, precision="32-true", compile=False, warmup_steps=5, steps=40,
        eval_warmup_steps=3, eval_steps=40, repeats=7, threads=1,
    ),
    "gpu": dict(
        backbone=DEFAULT_BACKBONE, input_size=224, patch_size=None, global_pool=None, batch_size=256,
        eval_batch_size=512, precision="bf16-mixed", compile=True, warmup_steps=10, steps=30,
        eval_warmup_steps=5, eval_steps=15, repeats=3, threads=None,
    ),
}  # fmt: skip
_LEAN = dict(progress_bar_refresh_rate=0, csv_logger=False, run_timer=False)
ABLATIONS = (
    TrainerSetup("no_progress_bar", progress_bar_refresh_rate=0),
    TrainerSetup("lean", **_LEAN),
    TrainerSetup("lean_no_host_metrics", **_LEAN, host_metrics=False),
)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--backbone", help=f"timm name (cpu: test_vit, gpu: {DEFAULT_BACKBONE})")
    parser.add_argument("--input-size", type=int)
    parser.add_argument("--patch-size", type=int)
    parser.add_argument("--global-pool", choices=["token", "avg"])
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--eval-batch-size", type=int)
    parser.add_argument("--precision", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--warmup-steps", type=int, help="training steps before the window (>= 1)")
    parser.add_argument("--steps", type=int, help="training steps in the window")
    parser.add_argument("--eval-warmup-steps", type=int)
    parser.add_argument("--eval-steps", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (cpu default 1; gpu: unchanged)")
    parser.add_argument("--workers", type=int, help="DataLoader workers (cpu 1; gpu cores - 2, at most 10)")
    parser.add_argument("--cache-size", type=int, help="cached side in px (256 for input 224, else input)")
    parser.add_argument("--ablations", action="store_true", help="also the leaner Lightning setups")
    parser.add_argument("--breakdown-rounds", type=int, default=3, help="instrumented runs per path")
    parser.add_argument("--no-scalar-reads", action="store_true", help="skip the scalar-read count")
    parser.add_argument("--out", type=Path, help="result file (default experiments/results/...md)")
    parser.add_argument("--note", default="", help="free text stored with the result")
    args = parser.parse_args()
    # A backbone named on the command line keeps its own patch size and pooling unless they are given too.
    own_backbone = args.backbone is not None
    for key, value in PRESETS[args.accelerator].items():
        if getattr(args, key) is None and not (own_backbone and key in ("patch_size", "global_pool")):
            setattr(args, key, value)
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("--accelerator gpu: torch sees no CUDA device on this machine")
    counts = ("input_size", "batch_size", "eval_batch_size", "warmup_steps", "steps", "eval_warmup_steps")
    for name in (*counts, "eval_steps", "repeats", "breakdown_rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def _config(args: argparse.Namespace) -> BenchConfig:
    fields = {field.name for field in dataclasses.fields(BenchConfig)}
    return BenchConfig(**{key: value for key, value in vars(args).items() if key in fields})


def _build_paths(cfg: BenchConfig, ablations: bool, workdir: Path) -> dict:
    """{name: runner}; the Lightning paths share one module (per kind): a compiled backbone compiles once."""
    modules = {True: make_module(cfg)}
    paths: dict = {"bare": BareLoop(cfg)}
    for setup in (PROJECT_SETUP, *(ABLATIONS if ablations else ())):
        if setup.host_metrics not in modules:
            modules[setup.host_metrics] = make_module(cfg, host_metrics=False)
        name = "lightning_synthetic" + ("" if setup is PROJECT_SETUP else f"_{setup.name}")
        paths[name] = LightningPath(cfg, setup, modules[setup.host_metrics], workdir)
    paths["lightning_cache"] = LightningPath(cfg, PROJECT_SETUP, modules[True], workdir)
    return paths


def _measure(paths: dict, data, repeats: int) -> dict[str, dict[str, list[Window]]]:
    """Every path trains, then every path evaluates, `repeats` times; the order rotates each repeat."""
    results: dict[str, dict[str, list[Window]]] = {name: {"train": [], "eval": []} for name in paths}
    names = list(paths)
    for repeat in range(repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for kind in ("train", "eval"):
            for name in order:
                runner = paths[name]
                window = (runner.train if kind == "train" else runner.evaluate)(data(name, kind))
                results[name][kind].append(window)
                print(
                    f"repeat {repeat} {kind:5s} {name:42s} {window.images_per_s:10.1f} images/s", flush=True
                )
                gc.collect()  # old Trainers hold DataLoader workers and device memory through cycles
    return results


def _scalar_reads(runner, cfg: BenchConfig, kind: str, data) -> dict[str, float]:
    """Scalar reads per step by caller: (reads over 1 + 8 steps - reads over 1 + 2 steps) / 6."""
    counts = []
    for steps in (2, 8):
        runner.cfg = dataclasses.replace(
            cfg, warmup_steps=1, steps=steps, eval_warmup_steps=1, eval_steps=steps
        )
        with ScalarReads() as reads:
            (runner.train if kind == "train" else runner.evaluate)(data(runner.cfg))
        counts.append(reads.by_caller)
    runner.cfg = cfg
    per_step = {name: (counts[1].get(name, 0) - counts[0].get(name, 0)) / 6 for name in counts[1]}
    return {name: round(value, 2) for name, value in sorted(per_step.items()) if value}


def _checks(table: dict, accelerator: str, costs: dict) -> dict:
    synthetic = table["lightning_synthetic"]["train"]["vs_bare"]
    synthetic_cpu = table["lightning_synthetic"]["train"]["cpu_time_vs_bare"]
    cache_train, cache_eval = (table["lightning_cache"][kind]["vs_bare"] for kind in ("train", "eval"))
    gpu_met = cache_train >= GPU_TARGETS["train"] and cache_eval >= GPU_TARGETS["eval"]
    return {
        "loop_overhead_time_ratio": round(1 / synthetic, 4),
        "loop_overhead_target": LOOP_OVERHEAD_TARGET,
        "loop_overhead_met": 1 / synthetic <= LOOP_OVERHEAD_TARGET,
        # The same ratio in CPU seconds of this process: blind to time lost to other work on the machine.
        "loop_overhead_cpu_time_ratio": round(1 / synthetic_cpu, 4),
        # (1 + overhead) / (1 + bare's overhead), each step / work within the same instrumented runs.
        "loop_overhead_work_normalised": {
            name: round((1 + block["train"]["overhead"]) / (1 + costs["bare"]["train"]["overhead"]), 4)
            for name, block in costs.items()
            if name != "bare" and block["train"]["overhead"] is not None
        },
        "cache_vs_bare_train": cache_train,
        "cache_vs_bare_eval": cache_eval,
        "gpu_targets": GPU_TARGETS,
        "gpu_targets_met": gpu_met if accelerator == "gpu" else None,
    }


def main() -> None:
    args = _parse_args()
    cfg = _config(args)
    cores = len(os.sched_getaffinity(0))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    gpu_workers = max(0, min(cores - 2, 10))  # a core each for the training process and its pin thread
    workers = args.workers if args.workers is not None else 1 if cfg.accelerator == "cpu" else gpu_workers
    cache_size = args.cache_size or (256 if cfg.input_size == 224 else cfg.input_size)
    for logger in ("lightning.pytorch", "lightning.fabric"):  # "GPU available: ...", tips, per Trainer
        logging.getLogger(logger).setLevel(logging.WARNING)
    # Short runs on random labels leave labels without positives: the per-epoch AUROC warning is expected.
    logging.getLogger("xraycls.model.metrics").setLevel(logging.ERROR)
    for message in (
        "does not have many workers",
        "smaller than the logging interval",
        "exists and is not empty",
    ):
        warnings.filterwarnings("ignore", message=f".*{message}.*")

    flops = count_flops(cfg.backbone, cfg.timm_kwargs, cfg.input_size)
    peak, device_name = peak_tflops(cfg.device, cfg.precision)
    with tempfile.TemporaryDirectory(prefix="xraycls-train-bench-") as tmp:
        cache_dir, val_fraction, data_info = make_cache(Path(tmp), cfg, cache_size, cores)
        train_dm, eval_dm = make_datamodules(cache_dir, cfg, cache_size, val_fraction, workers)
        batches = {
            "train": make_device_batches(2, cfg.batch_size, cfg.input_size, cfg.device, cfg.seed),
            "eval": make_device_batches(2, cfg.eval_batch_size, cfg.input_size, cfg.device, cfg.seed + 1),
        }

        def data(name: str, kind: str, c: BenchConfig = cfg):
            if name == "lightning_cache":
                return train_dm if kind == "train" else eval_dm
            return DeviceBatches(batches[kind], c.train_total if kind == "train" else c.eval_total)

        paths = _build_paths(cfg, args.ablations, Path(tmp) / "logs")
        load_before = os.getloadavg()
        results = _measure(paths, data, args.repeats)
        load_after = os.getloadavg()
        instrumented = [
            name for name in paths if name == "bare" or name.endswith(("synthetic", "no_host_metrics"))
        ]
        step_costs = step_breakdown(paths, instrumented, data, cfg, args.breakdown_rounds)
        scalar_reads = None
        if not cfg.compile and not args.no_scalar_reads:  # a dispatch mode cannot watch compiled code
            scalar_reads = {
                f"{name}/{kind}": _scalar_reads(
                    paths[name], cfg, kind, lambda c, n=name, k=kind: data(n, k, c)
                )
                for name in paths
                if name != "lightning_cache"
                for kind in ("train", "eval")
            }

    table = {}
    for name, result in results.items():
        row = {}
        for kind, flops_key in (("train", "train"), ("eval", "forward")):
            row[kind] = summarise(result[kind], None if name == "bare" else results["bare"][kind])
            row[kind]["mfu"] = mfu(row[kind]["images_per_s"], flops[flops_key], peak)
        table[name] = row
    report = {
        "benchmark": "train_throughput",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "machine": {
            "cpu_model": cpu_model(),
            "cores_available": cores,
            "device": device_name,
            "torch_threads": torch.get_num_threads(),
            "loader_workers": workers,
            "load_average_1_5_15_before": [round(x, 2) for x in load_before],
            "load_average_1_5_15_after": [round(x, 2) for x in load_after],
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "timm": timm.__version__,
            "torchmetrics": torchmetrics.__version__,
        },
        "setting": {**dataclasses.asdict(cfg), "repeats": args.repeats, "data": data_info},
        "flops_per_image": {
            "counted": flops,
            "vit_formula": vit_formula_flops(cfg.backbone, cfg.timm_kwargs),
        },
        "peak_tflops": peak,
        "results": table,
        "checks": _checks(table, cfg.accelerator, step_costs),
        "scalar_reads_per_step": scalar_reads,
        "step_costs": step_costs,
        "dynamo": _dynamo_stats() if cfg.compile else None,
        "note": args.note,
    }
    out = args.out or RESULTS / f"train_throughput_{cfg.accelerator}_{dt.date.today().isoformat()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(report))
    print(json.dumps({key: report[key] for key in ("results", "checks", "scalar_reads_per_step")}, indent=2))
    print(f"wrote {out}")


def _dynamo_stats() -> dict:
    """torch._dynamo's counters (graphs compiled, recompilations): a path past the recompile limit would
    silently run eager and look slow."""
    from torch._dynamo.utils import counters

    return {group: dict(values) for group, values in counters.items() if group in ("stats", "recompiles")}


if __name__ == "__main__":
    main()
