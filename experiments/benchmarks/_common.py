"""What the benchmarks share: the project's Hydra config, the machine, a rate clock, the result file."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

__all__ = ["PROJECT_ROOT", "RESULTS", "compose_config", "cpu_model", "machine", "rate", "versions", "write"]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RESULTS = PROJECT_ROOT / "experiments" / "results"
sys.path.insert(0, str(PROJECT_ROOT / "tests"))  # test helpers the benchmarks reuse (_nih_sample)


def compose_config(overrides: list[str], output_dir: Path | str) -> DictConfig:
    """conf/config.yaml with `overrides`, as `python train.py` would see it, writing under `output_dir`."""
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[*overrides, f"paths.output_dir={output_dir}"])


def cpu_model() -> str:
    """`lscpu`'s "Model name", else platform's guess, else "unknown"."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name:")]
    return names[0] if names else "unknown"


def machine(load_before: tuple[float, ...], **extra: Any) -> dict[str, Any]:
    """The machine block of a result: CPU model, cores this process may use, load average before and now."""
    return {
        "cpu_model": cpu_model(),
        "cores_available": len(os.sched_getaffinity(0)),
        **extra,
        "load_average_1_5_15_before": [round(x, 2) for x in load_before],
        "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
    }


def versions(*modules: Any) -> dict[str, str]:
    """{"python": ..., name: __version__} for each module given."""
    names = {"cv2": "opencv", "PIL": "pillow"}
    return {"python": platform.python_version()} | {
        names.get(m.__name__, m.__name__): m.__version__ for m in modules
    }


def rate(step: Callable[[], Any], seconds: float) -> float:
    """Calls of `step` per second over about `seconds` (after one untimed call)."""
    step()
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        step()
        count += 1
    return count / elapsed


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
