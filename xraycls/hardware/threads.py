"""The machine as the CPU thread rule sees it: the cores this process may use, how many of them are idle
right now, and applying a plan's thread count to torch.

The rule itself (`xraycls.hardware.plan.resolve_cpu_threads`) is a pure function of these readings, so it is
tested with any core count; this module only reads the machine. Idle cores come from two reads of
/proc/stat 0.2 s apart (Linux), else from the 1-minute load average (macOS), else they are unknown.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xraycls.hardware.plan import HardwarePlan

__all__ = ["available_cores", "idle_cores", "apply_cpu_threads"]

log = logging.getLogger(__name__)
_PROC_STAT = "/proc/stat"
_IDLE_FIELDS = (3, 4)  # idle, iowait: the columns after "cpuN" in /proc/stat


def available_cores() -> int:
    """Cores this process may run on (its affinity mask: a container's or taskset's limit), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _cpu_ticks(cpus: set[int] | None) -> tuple[int, int] | None:
    """(idle ticks, total ticks) summed over `cpus` (None: every core) from /proc/stat, or None."""
    try:
        with open(_PROC_STAT, encoding="ascii") as stat:
            lines = stat.read().splitlines()
    except OSError:
        return None
    idle = total = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or (cpus is not None and int(name[3:]) not in cpus):
            continue
        ticks = [int(value) for value in fields[:8]]  # guest time is already inside user time
        idle += sum(ticks[i] for i in _IDLE_FIELDS)
        total += sum(ticks)
    return (idle, total) if total else None


def idle_cores(interval: float = 0.2) -> float | None:
    """Core-equivalents idle over the next `interval` seconds among the cores this process may use (this
    process sleeps meanwhile, so it does not count itself); None where the machine cannot say."""
    cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cores = available_cores()
    first = _cpu_ticks(cpus)
    if first is not None:
        time.sleep(interval)
        second = _cpu_ticks(cpus)
        if second is not None and second[1] > first[1]:
            return cores * (second[0] - first[0]) / (second[1] - first[1])
    try:
        return max(0.0, cores - os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def apply_cpu_threads(plan: HardwarePlan) -> HardwarePlan:
    """Set torch's intra-op threads to the plan's `cpu_threads`; where the plan leaves them to torch (None),
    the plan returned records the count torch uses."""
    import torch  # here: the readings above need no torch

    if plan.cpu_threads is None:
        return replace(plan, cpu_threads=torch.get_num_threads())
    torch.set_num_threads(plan.cpu_threads)
    log.info(
        "torch intra-op threads: %d (hardware.cpu_threads, %s)", plan.cpu_threads, plan.cpu_threads_source
    )
    return plan
