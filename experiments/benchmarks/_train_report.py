"""Summaries and the Markdown result file of `train_throughput.py`."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence

from _train_loops import Window

__all__ = ["summarise", "markdown"]


def summarise(windows: Sequence[Window], bare: Sequence[Window] | None) -> dict:
    """Median images/s over the repeats (and each repeat's), RunTimer's median reading where it ran, and
    against the bare loop: the ratio of the medians and the median of the per-repeat ratios."""
    rates = [window.images_per_s for window in windows]
    summary: dict = {
        "images_per_s": round(statistics.median(rates), 1),
        "repeats": [round(r, 1) for r in rates],
    }
    cpu_rates = [window.cpu_images_per_s for window in windows]
    summary["cpu_time_images_per_s"] = round(statistics.median(cpu_rates), 1)
    timer = [w.run_timer_images_per_s for w in windows if w.run_timer_images_per_s is not None]
    if timer:
        summary["run_timer_images_per_s"] = round(statistics.median(timer), 1)
    if bare is not None:
        bare_rates = [window.images_per_s for window in bare]
        summary["vs_bare"] = round(statistics.median(rates) / statistics.median(bare_rates), 4)
        pairs = [rate / base for rate, base in zip(rates, bare_rates, strict=True)]
        summary["vs_bare_median_of_repeats"] = round(statistics.median(pairs), 4)
        bare_cpu = statistics.median(window.cpu_images_per_s for window in bare)
        summary["cpu_time_vs_bare"] = round(statistics.median(cpu_rates) / bare_cpu, 4)
    return summary


_COSTS_INTRO = (
    "Where a step's time goes: CPU ms of this process per step, medians of {rounds} instrumented runs per"
    " path; work = backbone forward + backward + AdamW update + zero_grad + lr scheduler step (the parts"
    " both loops share); overhead = step / work - 1 within each run. Indented parts run inside the line"
    " above; the backbone forward runs inside training_step on the Lightning paths."
)


def _costs_table(costs: dict) -> list[str]:
    names = list(costs)
    lines = ["| run | part | " + " | ".join(names) + " | calls |", "| --- " * (len(names) + 3) + "|"]
    for kind in ("train", "eval"):
        blocks = [costs[name][kind] for name in names]
        for key, label, pattern in (
            ("step_cpu_ms", "**whole step**", "{:.2f}"),
            ("work_cpu_ms", "**work**", "{:.2f}"),
            ("overhead", "**overhead**", "{:+.1%}"),
        ):
            cells = " | ".join(_fmt(block[key], pattern) for block in blocks)
            lines.append(f"| {kind} | {label} | {cells} | |")
        for label in dict.fromkeys(label for block in blocks for label in block["parts"]):
            cells = " | ".join(_fmt(block["parts"].get(label), "{:.3f}") for block in blocks)
            calls = max(block["calls"].get(label, 0) for block in blocks)
            lines.append(f"| {kind} | {label.replace('  ', '&nbsp;&nbsp;')} | {cells} | {calls:g} |")
    return lines


def _fmt(value: float | None, pattern: str = "{:,.1f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return pattern.format(value)


def _header(report: dict) -> list[str]:
    s, m = report["setting"], report["machine"]
    return [
        f"# Training throughput, {s['accelerator']}, {report['date'][:10]}",
        "",
        f"Machine: {m['cpu_model']} (`lscpu` model name), {m['cores_available']} cores available"
        f" (shared with other work), device: {m['device']}; torch threads {m['torch_threads']},"
        f" loader workers {m['loader_workers']}. Load average (1/5/15 min) before"
        f" {m['load_average_1_5_15_before']}, after {m['load_average_1_5_15_after']}.",
        "",
        f"Setting: {s['backbone']} at {s['input_size']} px (patch {s['patch_size'] or 'default'}, pool"
        f" {s['global_pool'] or 'default'}), batch {s['batch_size']} train / {s['eval_batch_size']} eval,"
        f" {s['precision']}, compile {'on' if s['compile'] else 'off'}; {s['warmup_steps']} + {s['steps']}"
        f" train steps and {s['eval_warmup_steps']} + {s['eval_steps']} eval batches (warm-up + measured)"
        f" per run, {s['repeats']} interleaved repeats; medians of the repeats below.",
        "",
        f"Command: `{report['command']}`",
    ]


def markdown(report: dict) -> str:
    """The result file: header (machine, setting), the table, the checks, scalar reads, the full JSON."""
    lines = _header(report)
    on_cpu = report["setting"]["accelerator"] == "cpu"
    cpu_head = " train vs bare, CPU time | eval vs bare, CPU time |" if on_cpu else ""
    lines += [
        "",
        "| path | train images/s | vs bare | eval images/s | vs bare | train MFU | eval MFU |" + cpu_head,
        "| --- " * (9 if on_cpu else 7) + "|",
    ]
    for name, row in report["results"].items():
        train, evaluation = row["train"], row["eval"]
        line = (
            f"| {name} | {_fmt(train['images_per_s'])} | {_fmt(train.get('vs_bare'), '{:.3f}x')} "
            f"| {_fmt(evaluation['images_per_s'])} | {_fmt(evaluation.get('vs_bare'), '{:.3f}x')} "
            f"| {_fmt(train['mfu'], '{:.1%}')} | {_fmt(evaluation['mfu'], '{:.1%}')} |"
        )
        if on_cpu:
            line += (
                f" {_fmt(train.get('cpu_time_vs_bare'), '{:.3f}x')} "
                f"| {_fmt(evaluation.get('cpu_time_vs_bare'), '{:.3f}x')} |"
            )
        lines.append(line)
    c = report["checks"]
    lines += [
        "",
        f"Loop overhead, time per training step of lightning_synthetic / bare:"
        f" {c['loop_overhead_time_ratio']:.3f}x (target <= {c['loop_overhead_target']:.2f}x):"
        f" **{'met' if c['loop_overhead_met'] else 'NOT met'}**; in CPU time of this process"
        f" {c['loop_overhead_cpu_time_ratio']:.3f}x; work-normalised (see below):"
        f" {', '.join(f'{k} {v:.3f}x' for k, v in c['loop_overhead_work_normalised'].items()) or 'n/a'}.",
    ]
    if not on_cpu:
        lines.append(
            f"GPU targets, lightning_cache / bare: train {c['cache_vs_bare_train']:.3f}x (>= 0.98), eval"
            f" {c['cache_vs_bare_eval']:.3f}x (>= 0.95): **{'met' if c['gpu_targets_met'] else 'NOT met'}**."
        )
    else:
        lines.append(
            "**No GPU number was measured**: this run used the CPU, where the GPU targets (cache-fed path"
            " >= 0.98x train, >= 0.95x eval of the bare loop) do not apply."
        )
    reads = report.get("scalar_reads_per_step")
    if reads:
        lines += [
            "",
            "Tensor -> Python value reads per step (each one a host-device sync on a GPU), by caller:",
        ]
        lines += [f"- {key}: {value or 'none'}" for key, value in reads.items()]
    costs = report.get("step_costs")
    if costs:
        lines += ["", _COSTS_INTRO.format(rounds=costs["bare"]["train"]["rounds"]), ""]
        lines += _costs_table(costs)
    lines += ["", "```json", json.dumps(report, indent=2), "```", ""]
    return "\n".join(lines)
