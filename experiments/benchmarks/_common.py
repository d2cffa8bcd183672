"""What the benchmarks share: the project's Hydra config, the machine, rate clocks, the result file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from xraycls.files import write_text

__all__ = [
    "PROJECT_ROOT", "RESULTS", "NIH_SHARED", "compose_config", "cpu_model", "machine", "versions", "rate",
    "median", "fmt", "table", "markdown", "write",
]  # fmt: skip

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RESULTS = PROJECT_ROOT / "experiments" / "results"
NIH_SHARED = PROJECT_ROOT.parent / "shared" / "nih"
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


def median(values: Iterable[float | None], digits: int = 4) -> float | None:
    """The median of the values that are not None, rounded; None when there are none."""
    kept = [value for value in values if value is not None]
    return round(statistics.median(kept), digits) if kept else None


def fmt(value: Any, pattern: str = "{:,.1f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A Markdown table's lines; cells as given (str() of each)."""
    lines = ["| " + " | ".join(header) + " |", "| --- " * len(header) + "|"]
    return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def markdown(title: str, lines: Sequence[str], result: dict) -> str:
    """A result file: the title, `lines` (paragraphs, tables), then the whole result as a JSON block."""
    return "\n".join([f"# {title}", "", *lines, "", "```json", json.dumps(result, indent=2), "```", ""])


def write(path: Path, text: str) -> None:
    write_text(path, text)
    print(f"wrote {path}")
