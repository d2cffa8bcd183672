"""Flavors: rented machines with a price, read from `NAME.yaml` files with plain YAML (no Hydra); the
project's are in experiments/cost_study/flavors/.

A flavor names the hardware config its runs use, a price per hour for the whole machine, a currency, where
the price came from and when (`source`, `as_of`), and `placeholder` (true until someone checks the price:
every report that uses it says so). Its `plan` (accelerator, and any of devices, nodes, ipus: the keys of
`xraycls.hardware.plan.HardwarePlan`) and optional `device_match` (a substring of the CUDA device name) are
what a run's recorded hardware is matched against; `hardware` says how to run on it, not how to match.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Flavor", "load_flavor", "load_flavors", "parse_flavor_assignments"]

_PLAN_KEYS = ("accelerator", "devices", "nodes", "ipus")


def _accelerator(name: Any) -> str:
    # summary.json records Lightning's accelerator class ("cuda"); configs say "gpu".
    text = str(name).lower()
    return "cuda" if text == "gpu" else text


@dataclass(frozen=True)
class Flavor:
    name: str  # the YAML file's stem
    hardware: str  # conf/hardware/<hardware>.yaml its runs use
    price_per_hour: float  # for the whole rented machine, in `currency`
    currency: str
    source: str  # where the price came from
    as_of: str | None  # when the price was read
    placeholder: bool  # true: not a verified price
    plan: dict[str, Any]  # accelerator + any of devices, nodes, ipus: matched against summary's hardware
    device_match: str | None = None  # substring of a device name in summary.json's versions.devices
    description: str = ""
    note: str = ""
    overrides: tuple[str, ...] = ()  # extra train.py overrides its runs need (e.g. trainer.devices=8)

    def matches(self, hardware: dict[str, Any], device_names: Sequence[str] = ()) -> bool:
        """True when a run's recorded hardware plan (summary.json's `hardware`) fits this flavor's `plan`,
        and, if the flavor names one, a device name (summary.json's `versions.devices`) holds
        `device_match`."""
        if _accelerator(self.plan.get("accelerator")) != _accelerator(hardware.get("accelerator")):
            return False
        if any(key in self.plan and self.plan[key] != hardware.get(key) for key in _PLAN_KEYS[1:]):
            return False
        return self.device_match is None or any(self.device_match in name for name in device_names)

    def money(self, seconds: float | None) -> float | None:
        return None if seconds is None else seconds / 3600.0 * self.price_per_hour


def load_flavor(path: str | Path) -> Flavor:
    """One flavor file; ValueError naming the file and the field when a price or field is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"flavor file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a flavor is a mapping of fields, got {type(data).__name__}")
    price = data.get("price_per_hour")
    if isinstance(price, bool) or not isinstance(price, int | float) or not math.isfinite(price) or price < 0:
        raise ValueError(
            f"{path}: price_per_hour must be a number >= 0 (per hour, whole machine), got {price!r}"
        )
    for key in ("hardware", "currency", "source"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise ValueError(f"{path}: {key} must be a non-empty string, got {data.get(key)!r}")
    if not isinstance(data.get("placeholder"), bool):
        raise ValueError(f"{path}: placeholder must be true or false, got {data.get('placeholder')!r}")
    if not data["placeholder"] and not data.get("as_of"):
        raise ValueError(f"{path}: a verified price (placeholder: false) needs as_of, the date it was read")
    plan = data.get("plan")
    if not isinstance(plan, dict) or "accelerator" not in plan:
        raise ValueError(f"{path}: plan must be a mapping with accelerator and any of devices, nodes, ipus")
    unknown = set(plan) - set(_PLAN_KEYS)
    if unknown:
        raise ValueError(f"{path}: plan has unknown keys {sorted(unknown)}; allowed: {list(_PLAN_KEYS)}")
    return Flavor(
        name=path.stem,
        hardware=data["hardware"],
        price_per_hour=float(price),
        currency=data["currency"],
        source=data["source"],
        as_of=str(data["as_of"]) if data.get("as_of") else None,
        placeholder=data["placeholder"],
        plan=dict(plan),
        device_match=data.get("device_match"),
        description=str(data.get("description") or ""),
        note=str(data.get("note") or ""),
        overrides=tuple(str(item) for item in data.get("overrides") or ()),
    )


def load_flavors(directory: str | Path) -> dict[str, Flavor]:
    """Every `*.yaml` flavor in `directory`, by name; a bad file stops with its name and problem."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"flavor folder not found: {directory}")
    return {path.stem: load_flavor(path) for path in sorted(directory.glob("*.yaml"))}


def parse_flavor_assignments(items: Iterable[str]) -> dict[str, str]:
    """`NAME=RUN_GLOB` strings (`xraycls cost --flavor`) as {flavor name: glob of run directories}.

    ValueError for an item without both parts, and for a name given twice.
    """
    assign: dict[str, str] = {}
    for item in items:
        name, sep, pattern = item.partition("=")
        if not sep or not name or not pattern:
            raise ValueError(f"--flavor {item!r}: expected NAME=RUN_GLOB, e.g. cpu_vm='runs/demo/*'")
        if name in assign:
            raise ValueError(f"--flavor {name} is given twice ({assign[name]!r} and {pattern!r})")
        assign[name] = pattern
    return assign
