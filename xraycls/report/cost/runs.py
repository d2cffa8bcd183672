"""What a run costs: run timings (summary.json) x flavor prices (`flavor`), and at k x the data.

Per run, in seconds of wall time:

- preparation = download + prepare (from their reports; extraction runs inside the download's wall time);
  paid once per dataset, counted once per run, as the guide measured "preparation + training".
- training = the run's `timing.total` (fit, validation, test, export, plots), less the cache build when the
  run made the cache itself (it is preparation).
- per-image work = epochs x trained images (the train part less the partial last step the loader drops)
  / train images/s + evaluated images / eval images/s, at the throughputs measured after warm-up;
  fixed = training - per-image work (set-up, compilation, warm-up batches, per-epoch checkpoints, export,
  plots: what does not grow with the data).

At k x the data: preparation x k, fixed unchanged, per-image work x k. The guide's naive estimate scales the
whole run by k; `difference` = naive - ours. Money = seconds / 3600 x price_per_hour.

Repeats vary: `CostGroup.training_cv` (sample std / mean of the training seconds) above `NOISY_CV` means the
machine was not quiet, and a run priced with a flavor whose plan does not fit its recorded hardware gets a
group warning; the report puts both at its top.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xraycls.report.cost.flavor import Flavor

__all__ = [
    "RunCost",
    "CostGroup",
    "load_run",
    "group_runs",
    "Stat",
    "describe",
    "NOISY_CV",
]

SUMMARY = "summary.json"
# What must agree between repeats of one experiment under one flavor (backbone: from config.yaml).
_IDENTITY = ("task_name", "split", "source", "image_size", "input_size", "global_batch", "images", "epochs")
NOISY_CV = 0.20  # training seconds' std / mean over repeats above which the means are not comparable


@dataclass(frozen=True)
class RunCost:
    """One finished run's seconds, split into preparation, fixed and per-image work (module doc)."""

    run_dir: Path
    identity: dict[str, Any]  # what repeats of one experiment share (_IDENTITY)
    hardware: dict[str, Any]  # summary.json's hardware block
    device_names: tuple[str, ...]
    download: float | None
    extraction: float | None  # inside `download`, for information
    prepare: float | None
    training: float
    setup: float | None
    compile: float | None
    per_image: float
    train_images_per_s: float
    notes: tuple[str, ...] = ()

    @property
    def preparation(self) -> float:
        return (self.download or 0.0) + (self.prepare or 0.0)

    @property
    def fixed(self) -> float:
        return self.training - self.per_image

    @property
    def total(self) -> float:
        return self.preparation + self.training

    def scaled(self, k: float) -> dict[str, float]:
        """Seconds at k x the data: ours (fixed kept) and the guide's naive linear scaling, and the gap."""
        training = self.fixed + k * self.per_image
        total = k * self.preparation + training
        naive = k * self.total
        return {"preparation": k * self.preparation, "training": training, "total": total, "naive": naive,
                "difference": naive - total}  # fmt: skip


def _number(summary: dict, path: str, where: Path, *, required: bool = True) -> float | None:
    value: Any = summary
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if required:
        raise ValueError(f"{where}: {path} is missing or not a number ({value!r}); was the run finished?")
    return None


def load_run(run_dir: str | Path) -> RunCost:
    """Read `run_dir/summary.json` into a RunCost; FileNotFoundError / ValueError naming the file and key."""
    run_dir = Path(run_dir)
    path = run_dir / SUMMARY
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {SUMMARY} (not a finished run directory)")
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: unreadable ({error})") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: not a run summary (a JSON object), got {type(summary).__name__}")
    if summary.get("resumed_from"):
        raise ValueError(
            f"{path}: the run resumed from {summary['resumed_from']}; its timings cover only the part after "
            "the resume, so its cost is not a whole run's (leave it out)"
        )
    hardware = summary.get("hardware")
    if not isinstance(hardware, dict) or not hardware.get("accelerator"):
        raise ValueError(
            f"{path}: hardware (the resolved plan: accelerator, devices, ...) is missing, got {hardware!r}; "
            "without it the run can be neither grouped nor priced"
        )
    timing, data = summary.get("timing") or {}, summary.get("data") or {}
    epochs = timing.get("epochs") or []
    images = data.get("images") or {}
    if not epochs or not isinstance(images.get("train"), int):
        raise ValueError(f"{path}: timing.epochs or data.images.train is missing; no epoch was timed")
    total = _number(summary, "timing.total", path)
    notes: list[str] = []
    prepare = _number(summary, "timing.prepare", path, required=False)
    if prepare is not None and (summary.get("preparation") or {}).get("prepare_in_run"):
        total -= prepare  # the run built the cache: those seconds are preparation, not training
        notes.append("built the cache itself: its prepare seconds moved from training to preparation")
    train_rate = _number(summary, "throughput.train_images_per_s", path)
    if train_rate <= 0:
        raise ValueError(f"{path}: throughput.train_images_per_s is {train_rate}, not a measured rate")
    per_image = len(epochs) * _trained_images(images["train"], hardware) / train_rate
    per_image += _eval_seconds(summary, timing, images, path, notes)
    training = total
    if per_image > training:
        notes.append(
            f"per-image work at the measured throughput ({per_image:.1f} s) exceeds the measured training "
            f"({training:.1f} s): throughput varied within the run; fixed time comes out negative"
        )
    identity = {key: data.get(key) for key in _IDENTITY if key not in ("task_name", "epochs")}
    identity.update(task_name=summary.get("task_name"), epochs=len(epochs), backbone=_backbone(run_dir))
    return RunCost(
        run_dir=run_dir,
        identity=identity,
        hardware=dict(hardware),
        device_names=tuple((summary.get("versions") or {}).get("devices") or ()),
        download=_number(summary, "timing.download", path, required=False),
        extraction=_number(summary, "timing.extraction", path, required=False),
        prepare=prepare,
        training=training,
        setup=_number(summary, "timing.setup", path, required=False),
        compile=_number(summary, "timing.compile", path, required=False),
        per_image=per_image,
        train_images_per_s=train_rate,
        notes=tuple(notes),
    )


def _backbone(run_dir: Path) -> str | None:
    """model.backbone from the run's resolved config.yaml (summary.json does not name the model)."""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    model = config.get("model") if isinstance(config, dict) else None
    return str(model.get("backbone")) if isinstance(model, dict) and model.get("backbone") else None


# Recorded beside the plan, not part of it: `cpu_threads=auto` picks by the load when each run starts, so
# repeats on one machine may differ, and they are still repeats of the same work.
_NOT_PLAN = ("cpu_threads", "cpu_threads_source")


def _plan_key(hardware: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in hardware.items() if key not in _NOT_PLAN}


def _trained_images(train: int, hardware: dict) -> int:
    """Images one epoch trains on: the loader drops the last partial step (`drop_last`), whose size is the
    plan's `samples_per_host_step` (else micro_batch x replicas; else nothing is dropped)."""
    step = hardware.get("samples_per_host_step")
    if not isinstance(step, int) and isinstance(hardware.get("micro_batch"), int):
        step = hardware["micro_batch"] * int(hardware.get("replicas") or 1)
    return train // step * step if isinstance(step, int) and step > 0 else train


def _eval_seconds(summary: dict, timing: dict, images: dict, path: Path, notes: list[str]) -> float:
    """Evaluated images / eval images/s. Validation runs: one per epoch that validated, plus the re-validation
    of the best checkpoint (timed outside any epoch); test: once when it ran."""
    epoch_validate = [float(entry.get("validate") or 0.0) for entry in timing.get("epochs") or []]
    validate_total = float(timing.get("validate") or 0.0)
    runs = sum(seconds > 0 for seconds in epoch_validate) + (validate_total - sum(epoch_validate) > 1e-6)
    count = runs * int(images.get("val") or 0) + (timing.get("test") is not None) * int(
        images.get("test") or 0
    )
    rate = _number(summary, "throughput.eval_images_per_s", path, required=False)
    if count and rate:
        return count / rate
    # Too few eval batches for a throughput after warm-up: their measured seconds count as per-image work.
    notes.append("no eval throughput measured: validate + test seconds counted as per-image work")
    return validate_total + float(timing.get("test") or 0.0)


@dataclass(frozen=True)
class Stat:
    mean: float | None
    std: float | None  # sample standard deviation (n - 1); None for n < 2
    n: int


def describe(values: Sequence[float | None]) -> Stat:
    """Mean, sample std and count of the values that are not None."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return Stat(None, None, 0)
    mean = sum(present) / len(present)
    if len(present) < 2:
        return Stat(mean, None, len(present))
    variance = sum((v - mean) ** 2 for v in present) / (len(present) - 1)
    return Stat(mean, math.sqrt(variance), len(present))


@dataclass
class CostGroup:
    """Repeats of one experiment on one flavor (or one recorded hardware plan when no flavor fits)."""

    label: str
    runs: list[RunCost]
    flavor: Flavor | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # shown at the top of the report

    @property
    def currency(self) -> str | None:
        return self.flavor.currency if self.flavor else None

    @property
    def training_cv(self) -> float | None:
        """Coefficient of variation of the training seconds: sample std / mean (None for one run)."""
        stat = self.stat("training")
        return None if stat.std is None or not stat.mean else stat.std / stat.mean

    def stat(self, quantity: str, *, money: bool = False) -> Stat:
        """A RunCost attribute over the repeats (preparation, training, total, fixed, per_image, setup,
        compile, download, extraction, prepare, train_images_per_s); money=True prices seconds with the
        flavor (n=0 without one)."""
        return self._describe([getattr(run, quantity) for run in self.runs], money)

    def scaled_stat(self, quantity: str, k: float, *, money: bool = False) -> Stat:
        """A `RunCost.scaled(k)` entry (preparation, training, total, naive, difference) over the repeats."""
        return self._describe([run.scaled(k)[quantity] for run in self.runs], money)

    def _describe(self, seconds: list[float | None], money: bool) -> Stat:
        if not money:
            return describe(seconds)
        if self.flavor is None:
            return Stat(None, None, 0)
        return describe([self.flavor.money(value) for value in seconds])


def _check_same(label: str, runs: list[RunCost], what: str, key: Any) -> None:
    first = key(runs[0])
    for run in runs[1:]:
        other = key(run)
        if other != first:
            fields = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
            detail = "; ".join(f"{k}: {first.get(k)!r} vs {other.get(k)!r}" for k in fields)
            raise ValueError(
                f"mixed {what} under {label}: {runs[0].run_dir} and {run.run_dir} differ in {detail}; "
                "costs are compared only between repeats of one experiment on one machine"
            )


def _plan_label(run: RunCost) -> str:
    """e.g. 'cpu: cpu x1', 'gpu: gpu x8 (NVIDIA H100 80GB HBM3)', 'vpod16: ipu x4, 16 IPUs'."""
    hardware = run.hardware
    label = f"{hardware.get('accelerator')} x{hardware.get('devices')}"
    if (hardware.get("nodes") or 1) != 1:
        label += f" x{hardware.get('nodes')} nodes"
    if hardware.get("ipus"):
        label += f", {hardware['ipus']} IPUs"
    if hardware.get("name"):
        label = f"{hardware['name']}: {label}"
    return label + (f" ({run.device_names[0]})" if run.device_names else "")


def group_runs(
    runs: Sequence[RunCost], flavors: dict[str, Flavor], assign: dict[str, str] | None = None
) -> list[CostGroup]:
    """Groups of repeats: runs whose path matches an `assign` glob ({flavor name: glob}) go to that flavor;
    the others are grouped by recorded hardware plan and priced with the one flavor whose plan fits (time
    only when none or several fit). ValueError on an unknown flavor, a glob matching no run, a run matched
    twice, or mixed experiments / hardware plans in one group."""
    assign = assign or {}
    chosen: dict[Path, str] = {}
    for name, pattern in assign.items():
        if name not in flavors:
            raise ValueError(f"--flavor {name}={pattern}: no flavor {name!r}; known: {sorted(flavors)}")
        hits = [run for run in runs if _path_matches(run.run_dir, pattern)]
        if not hits:
            raise ValueError(
                f"--flavor {name}={pattern}: the glob matches none of the {len(runs)} runs given"
            )
        for run in hits:
            if chosen.setdefault(run.run_dir, name) != name:
                raise ValueError(f"{run.run_dir} matches both --flavor {chosen[run.run_dir]} and {name}")
    groups: dict[str, CostGroup] = {}
    for run in runs:
        if run.run_dir in chosen:
            name = chosen[run.run_dir]
            group = groups.setdefault(f"flavor:{name}", CostGroup(name, [], flavors[name]))
        else:
            plan = json.dumps({**_plan_key(run.hardware), "devices_seen": run.device_names}, sort_keys=True)
            group = groups.setdefault(f"plan:{plan}", CostGroup(_plan_label(run), []))
        group.runs.append(run)
    for key, group in groups.items():
        _check_same(group.label, group.runs, "experiments", lambda run: run.identity)
        _check_same(group.label, group.runs, "hardware plans", lambda run: _plan_key(run.hardware))
        if key.startswith("plan:"):
            _price_by_plan(group, flavors)
        else:
            _warn_unfitting_flavor(group)
    return list(groups.values())


def _warn_unfitting_flavor(group: CostGroup) -> None:
    """A flavor chosen with --flavor prices whatever it is given: say so when the runs' recorded hardware
    is not the flavor's plan (CPU seconds priced at a GPU rate, say)."""
    run = group.runs[0]  # the group's runs share one hardware plan (checked)
    if group.flavor is not None and not group.flavor.matches(run.hardware, run.device_names):
        recorded = {key: run.hardware.get(key) for key in ("accelerator", "devices", "nodes", "ipus")}
        devices = f", devices {list(run.device_names)}" if run.device_names else ""
        match = f", device name containing {group.flavor.device_match!r}" if group.flavor.device_match else ""
        group.warnings.append(
            f"{group.label}: the runs' recorded hardware ({recorded}{devices}) does not fit the flavor's "
            f"plan ({group.flavor.plan}{match}); its prices are for another machine than the one timed."
        )


def _price_by_plan(group: CostGroup, flavors: dict[str, Flavor]) -> None:
    fits = [
        flavor
        for flavor in flavors.values()
        if flavor.matches(group.runs[0].hardware, group.runs[0].device_names)
    ]
    if len(fits) == 1:
        group.notes.append(f"priced as flavor {fits[0].name}: the only flavor whose plan fits {group.label}")
        group.flavor, group.label = fits[0], fits[0].name
    elif fits:
        names = ", ".join(flavor.name for flavor in fits)
        group.notes.append(f"time only: flavors {names} all fit; choose one with --flavor NAME=RUN_GLOB")
    else:
        group.notes.append("time only: no flavor's plan fits this hardware")


def _path_matches(run_dir: Path, pattern: str) -> bool:
    candidates = {str(run_dir), run_dir.as_posix(), str(run_dir.resolve())}
    return any(fnmatch.fnmatch(candidate, pattern) for candidate in candidates)
