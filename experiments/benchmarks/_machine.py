"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import platform
import subprocess

__all__ = ["cpu_model"]


def cpu_model() -> str:
    """`lscpu`'s "Model name", else platform's guess, else "unknown"."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name:")]
    return names[0] if names else "unknown"
