"""Building blocks of a run's summary.json: software versions, JSON-safe values, atomic JSON files.

JSON has no NaN or infinity (Python's `json` writes them as bare ``NaN``, which strict parsers reject), and
a metric such as the AUROC of a label with no positives is NaN: `to_jsonable` turns every non-finite number
into ``null``, and tensors, NumPy values, paths and dataclasses into plain Python.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import math
import os
import platform
import uuid
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

__all__ = ["collect_versions", "to_jsonable", "write_json"]

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


def to_jsonable(obj: Any) -> Any:
    """`obj` as plain JSON values: dict (str keys), list, str, int, float, bool, None.

    Tensors and NumPy arrays become (nested) lists, their scalars Python numbers; NaN and +-inf become None;
    paths become strings, enums their values, dates ISO strings, dataclasses dicts, sets sorted lists.
    Raises TypeError naming where in `obj` (e.g. ``metrics.test.model``) a value of another type sits.
    """
    return _convert(obj, "")


def _convert(obj: Any, where: str) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, enum.Enum):
        return _convert(obj.value, where)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, torch.Tensor):
        return _convert(obj.detach().cpu().tolist(), where)
    if isinstance(obj, (np.ndarray, np.generic)):
        return _convert(obj.tolist(), where)
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, (dt.datetime, dt.date, dt.time)):
        return obj.isoformat()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {field.name: getattr(obj, field.name) for field in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {
            str(key): _convert(value, f"{where}.{key}" if where else str(key)) for key, value in obj.items()
        }
    if isinstance(obj, (set, frozenset)):
        obj = sorted(obj, key=repr)
    if isinstance(obj, Sequence) and not isinstance(obj, (bytes, bytearray)):
        return [_convert(value, f"{where}[{i}]") for i, value in enumerate(obj)]
    raise TypeError(f"{where or 'value'}: a {type(obj).__name__} cannot be written to JSON ({obj!r:.80})")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write `to_jsonable(payload)` to `path` (indent 2, UTF-8), atomically: a crash leaves old file or none.

    Parent folders are created. The text goes to a temporary file beside `path`, is flushed to disk, then
    renamed over `path` (`os.replace`), so a reader never sees half a file.
    """
    path = Path(path)
    text = json.dumps(to_jsonable(payload), indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name opened with "x" (not mkstemp, which makes 0600 files): the file gets the umask's mode.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
