"""The software versions a run's summary.json records (JSON writing: `xraycls.files.write_json`)."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

import torch

__all__ = ["collect_versions"]

# Distribution name -> key in the versions dict; every one of these is a dependency of xraycls.
_PACKAGES: dict[str, str] = {
    "torch": "torch",
    "lightning": "lightning",
    "timm": "timm",
    "torchmetrics": "torchmetrics",
    "albumentations": "albumentations",
    "numpy": "numpy",
    "xraycls": "xraycls",
}
# Reported only where installed (the IPU stack exists on Graphcore hosts alone).
_OPTIONAL_PACKAGES: dict[str, str] = {"poptorch": "poptorch", "lightning-graphcore": "lightning_graphcore"}


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def collect_versions() -> dict[str, Any]:
    """{"python", "platform", <package>: version or None, "cuda": runtime version or None, "devices": [...]}.

    ``devices`` lists the CUDA device names this process sees (empty without CUDA); ``cuda`` is the CUDA
    version torch was built with, None where no GPU is usable.
    """
    versions: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for distribution, key in _PACKAGES.items():
        versions[key] = _version(distribution)
    versions["torch"] = torch.__version__  # with its build tag (e.g. +cu130), which metadata leaves out
    if versions["xraycls"] is None:  # running from a source tree that was never pip-installed
        import xraycls

        versions["xraycls"] = xraycls.__version__
    for distribution, key in _OPTIONAL_PACKAGES.items():
        found = _version(distribution)
        if found is not None:
            versions[key] = found
    cuda = torch.cuda.is_available()
    versions["cuda"] = torch.version.cuda if cuda else None
    versions["devices"] = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    )
    return versions
