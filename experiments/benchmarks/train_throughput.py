"""Train and eval images/s of the project's real training step, against a bare loop, in one run.

Every path is built from the project's Hydra config (conf/, composed with the preset's overrides and any
given on the command line), measured after warm-up in the same process, repeats interleaved (the order
rotates every repeat, so drift from other work on a shared machine hits every path alike):

- ``bare``: timm + (optionally) `torch.compile`, AdamW + per-step warm-up cosine, autocast for bf16, on
  synthetic batches already on the device and already normalised (`_train_loops.py`);
- ``lightning_synthetic``: the config's `XrayClassifier` + a real `lightning.Trainer` with the config's
  callbacks and logger (progress bar every 10 batches, CSV logger every 10 steps, RunTimer), fed the same
  on-device batches;
- ``lightning_cache``: the same, fed from a synthetic uint8 cache (`make_synthetic_nih` + `prepare_cache`
  in a temporary folder) through the config's `NIHDataModule` (workers, augmentation, device normalisation);
- with ``--ablations``, `lightning_synthetic` made leaner by config overrides, as a user may run it:
  ``..._no_progress_bar``, ``..._lean`` (also no logger, no RunTimer) and ``..._lean_no_host_metrics``
  (also none of the module's per-batch metric updates and logging: a subclass, for comparison only).

Checks: on the CPU the Lightning loop on synthetic batches takes at most 1.10x the time per training step
of the bare loop (ratio of the median images/s; also in CPU time and work-normalised); on a GPU the
cache-fed path reaches >= 0.98x the bare loop's train images/s and >= 0.95x its eval images/s. Also model
FLOPs per image and MFU where the card's peak is known, what each host-side hook costs per step, and
(without compile) the tensor -> Python reads per step by caller (`_train_probes.py`).

Writes ``experiments/results/train_throughput_<accelerator>_<date>.md`` (table, machine, load average, JSON).

    python experiments/benchmarks/train_throughput.py --ablations            # CPU, the demo's tiny ViT
    python experiments/benchmarks/train_throughput.py --accelerator gpu      # ViT-B/16, 224, bf16, compiled
    python experiments/benchmarks/train_throughput.py --steps 4 --repeats 1 data.batch_size=8   # overrides
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
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
from _common import RESULTS, compose_config, machine, versions, write
from _train_loops import BareLoop, DeviceBatches, LightningPath, Run, make_module
from _train_probes import ScalarReads, count_flops, mfu, peak_tflops, step_breakdown, vit_formula_flops
from _train_report import markdown, summarise

from xraycls.data.cache import prepare_cache
from xraycls.data.synthetic import make_synthetic_nih
from xraycls.training.config import instantiate

LOOP_OVERHEAD_TARGET = 1.10  # Lightning time per step / bare time per step, CPU, tiny ViT
GPU_TARGETS = {"train": 0.98, "eval": 0.95}  # cache-fed project images/s / bare images/s
_BASE = ["model.weights=none", "data.split=seed_random"]
PRESETS = {  # config overrides and window sizes per accelerator; the command line overrides both
    "cpu": dict(
        overrides=[*_BASE, "model=vit_tiny", "hardware=cpu", "data.image_size=64", "data.input_size=64",
                   "data.batch_size=16", "data.num_workers=1"],
        eval_batch_size=64, warmup_steps=5, steps=40, eval_warmup_steps=3, eval_steps=40, repeats=7,
        threads=1,
    ),
    "gpu": dict(
        overrides=[*_BASE, "model=vit_b16", "hardware=gpu", "model.compile=true", "data.batch_size=256",
                   f"data.num_workers={max(0, min(len(os.sched_getaffinity(0)) - 2, 10))}"],
        eval_batch_size=512, warmup_steps=10, steps=30, eval_warmup_steps=5, eval_steps=15, repeats=3,
        threads=None,
    ),
}  # fmt: skip
_LEAN = ["trainer.enable_progress_bar=false", "~logger", "~callbacks.run_timer"]
ABLATIONS = {  # name: (config overrides, the module's per-batch host work)
    "no_progress_bar": (["trainer.enable_progress_bar=false"], True),
    "lean": (_LEAN, True),
    "lean_no_host_metrics": (_LEAN, False),
}


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/ (e.g. data.batch_size=32)")
    parser.add_argument("--accelerator", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--eval-batch-size", type=int)
    parser.add_argument("--warmup-steps", type=int, help="training steps before the window (>= 1)")
    parser.add_argument("--steps", type=int, help="training steps in the window")
    parser.add_argument("--eval-warmup-steps", type=int)
    parser.add_argument("--eval-steps", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (cpu default 1; gpu: unchanged)")
    parser.add_argument("--ablations", action="store_true", help="also the leaner Lightning setups")
    parser.add_argument("--breakdown-rounds", type=int, default=3, help="instrumented runs per path")
    parser.add_argument("--no-scalar-reads", action="store_true", help="skip the scalar-read count")
    parser.add_argument("--out", type=Path, help="result file (default experiments/results/...md)")
    parser.add_argument("--note", default="", help="free text stored with the result")
    args = parser.parse_args()
    for key, value in PRESETS[args.accelerator].items():
        if key == "overrides":
            args.overrides = [*value, *args.overrides]
        elif getattr(args, key) is None:
            setattr(args, key, value)
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("--accelerator gpu: torch sees no CUDA device on this machine")
    for name in ("eval_batch_size", "warmup_steps", "steps", "eval_warmup_steps", "eval_steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def _cache_datamodules(base: Path, run: Run, cores: int) -> tuple:
    """A synthetic NIH tree and its cache holding every measured batch in one epoch (seed_random split, exact
    sizes), and the config's DataModule over it twice: batch `batch_size` (train), `eval_batch_size` (val)."""
    need_train, need_val = run.train_total * run.batch_size, run.eval_total * run.eval_batch_size
    n = need_train + need_val + run.batch_size + run.eval_batch_size
    size = int(run.cfg.data.image_size)
    workers = cores if n > 4000 else 1  # spawned pool processes re-import torch: worth it for big sets only
    # PNGs at <= 64 px (fast to render); prepare resizes them to the cache side like any NIH image.
    make_synthetic_nih(base / "raw", n, size=min(size, 64), seed=run.seed, workers=workers)
    prepare_cache(base / "raw", base / "cache", size=size, workers=workers, progress=False)
    fraction = (need_val + run.eval_batch_size // 2) / n
    common = {"cache_dir": str(base / "cache"), "val_fraction": fraction, "seed": run.seed}
    train_dm = instantiate(run.cfg.data, **common)
    eval_dm = instantiate(run.cfg.data, **common, batch_size=run.eval_batch_size)
    train_dm.setup("fit")
    eval_dm.setup("validate")
    if len(train_dm.datasets["train"]) // run.batch_size < run.train_total or (
        len(eval_dm.datasets["val"]) // run.eval_batch_size < run.eval_total
    ):
        raise RuntimeError(f"cache of {n} images too small for {run.train_total} / {run.eval_total} batches")
    return train_dm, eval_dm, {"images": n, "cache_size": size}


def _measure(paths: dict, data, repeats: int) -> dict:  # noqa: ANN001
    """Every path trains, then every path evaluates, `repeats` times; the order rotates each repeat."""
    results: dict = {name: {"train": [], "eval": []} for name in paths}
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


def _scalar_reads(runner, run: Run, kind: str, data) -> dict[str, float]:  # noqa: ANN001
    """Scalar reads per step by caller: (reads over 1 + 8 steps - reads over 1 + 2 steps) / 6."""
    counts = []
    for steps in (2, 8):
        runner.run = run.with_steps(steps, steps)
        with ScalarReads() as reads:
            (runner.train if kind == "train" else runner.evaluate)(data(runner.run))
        counts.append(reads.by_caller)
    runner.run = run
    per_step = {name: (counts[1].get(name, 0) - counts[0].get(name, 0)) / 6 for name in counts[1]}
    return {name: round(value, 2) for name, value in sorted(per_step.items()) if value}


def _checks(table: dict, accelerator: str, costs: dict) -> dict:
    synthetic = table["lightning_synthetic"]["train"]
    cache_train, cache_eval = (table["lightning_cache"][kind]["vs_bare"] for kind in ("train", "eval"))
    bare_overhead = costs["bare"]["train"]["overhead"]
    return {
        "loop_overhead_time_ratio": round(1 / synthetic["vs_bare"], 4),
        "loop_overhead_target": LOOP_OVERHEAD_TARGET,
        "loop_overhead_met": 1 / synthetic["vs_bare"] <= LOOP_OVERHEAD_TARGET,
        # The same ratio in CPU seconds of this process: blind to time lost to other work on the machine.
        "loop_overhead_cpu_time_ratio": round(1 / synthetic["cpu_time_vs_bare"], 4),
        # (1 + overhead) / (1 + bare's overhead), each step / work within the same instrumented runs.
        "loop_overhead_work_normalised": {
            name: round((1 + block["train"]["overhead"]) / (1 + bare_overhead), 4)
            for name, block in costs.items()
            if name != "bare" and block["train"]["overhead"] is not None
        },
        "cache_vs_bare_train": cache_train,
        "cache_vs_bare_eval": cache_eval,
        "gpu_targets": GPU_TARGETS,
        "gpu_targets_met": (
            cache_train >= GPU_TARGETS["train"] and cache_eval >= GPU_TARGETS["eval"]
            if accelerator == "gpu"
            else None
        ),
    }


def _quiet() -> None:
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


def main() -> None:
    args = _parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    _quiet()
    with tempfile.TemporaryDirectory(prefix="xraycls-train-bench-") as tmp:
        workdir = Path(tmp) / "logs"
        run = Run(
            compose_config(args.overrides, workdir), args.eval_batch_size, args.warmup_steps, args.steps,
            args.eval_warmup_steps, args.eval_steps,
        )  # fmt: skip
        setting = {
            **{key: run.model.get(key) for key in ("backbone", "patch_size", "global_pool", "compile")},
            "input_size": int(run.cfg.data.input_size),
            "batch_size": run.batch_size,
            **{
                key: getattr(run, key)
                for key in ("eval_batch_size", "precision", "accelerator", "warmup_steps")
            },
            **{key: getattr(run, key) for key in ("steps", "eval_warmup_steps", "eval_steps", "seed")},
            "overrides": args.overrides,
            "repeats": args.repeats,
        }
        flops = count_flops(run.model["backbone"], run.timm_kwargs, setting["input_size"])
        peak, device_name = peak_tflops(run.device, run.precision)
        train_dm, eval_dm, setting["data"] = _cache_datamodules(Path(tmp), run, len(os.sched_getaffinity(0)))

        modules = {True: make_module(run)}  # one per kind: a compiled backbone compiles once
        paths: dict = {"bare": BareLoop(run)}
        for name, (overrides, host_metrics) in {
            "": ([], True),
            **(ABLATIONS if args.ablations else {}),
        }.items():
            if host_metrics not in modules:
                modules[host_metrics] = make_module(run, host_metrics=False)
            cfg = compose_config([*args.overrides, *overrides], workdir)
            label = "lightning_synthetic" + (f"_{name}" if name else "")
            paths[label] = LightningPath(run, cfg, label, modules[host_metrics], workdir)
        paths["lightning_cache"] = LightningPath(run, run.cfg, "lightning_cache", modules[True], workdir)

        def data(name: str, kind: str, r: Run = run):  # noqa: ANN202
            if name == "lightning_cache":
                return train_dm if kind == "train" else eval_dm
            batch, length = (
                (r.batch_size, r.train_total) if kind == "train" else (r.eval_batch_size, r.eval_total)
            )
            return DeviceBatches(batch, setting["input_size"], r.device, r.seed + (kind == "eval"), length)

        load_before = os.getloadavg()
        results = _measure(paths, data, args.repeats)
        machine_block = machine(
            load_before, device=device_name, torch_threads=torch.get_num_threads(),
            loader_workers=int(run.cfg.data.num_workers),
        )  # fmt: skip
        instrumented = [
            name for name in paths if name == "bare" or name.endswith(("synthetic", "no_host_metrics"))
        ]
        classes = list(dict.fromkeys(type(m) for m in modules.values())) + [
            type(cb) for cb in paths["lightning_synthetic"]._callbacks(1)
        ]
        step_costs = step_breakdown(paths, instrumented, data, run, args.breakdown_rounds, classes)
        scalar_reads = None
        if (
            not run.model["compile"] and not args.no_scalar_reads
        ):  # a dispatch mode cannot watch compiled code
            scalar_reads = {
                f"{name}/{kind}": _scalar_reads(
                    paths[name], run, kind, lambda r, n=name, k=kind: data(n, k, r)
                )
                for name in paths
                if name != "lightning_cache"
                for kind in ("train", "eval")
            }

    table = {}
    for name, result in results.items():
        table[name] = {}
        for kind, flops_key in (("train", "train"), ("eval", "forward")):
            table[name][kind] = summarise(result[kind], None if name == "bare" else results["bare"][kind])
            table[name][kind]["mfu"] = mfu(table[name][kind]["images_per_s"], flops[flops_key], peak)
    report = {
        "benchmark": "train_throughput",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "machine": machine_block,
        "versions": versions(torch, lightning, timm, torchmetrics),
        "setting": setting,
        "flops_per_image": {
            "counted": flops,
            "vit_formula": vit_formula_flops(run.model["backbone"], run.timm_kwargs),
        },
        "peak_tflops": peak,
        "results": table,
        "checks": _checks(table, run.accelerator, step_costs),
        "scalar_reads_per_step": scalar_reads,
        "step_costs": step_costs,
        "dynamo": _dynamo_stats() if run.model["compile"] else None,
        "note": args.note,
    }
    write(
        args.out or RESULTS / f"train_throughput_{run.accelerator}_{dt.date.today().isoformat()}.md",
        markdown(report),
    )
    print(json.dumps({key: report[key] for key in ("results", "checks", "scalar_reads_per_step")}, indent=2))


def _dynamo_stats() -> dict:
    """torch._dynamo's counters: a path past the recompile limit would silently run eager and look slow."""
    from torch._dynamo.utils import counters

    return {group: dict(values) for group, values in counters.items() if group in ("stats", "recompiles")}


if __name__ == "__main__":
    main()
