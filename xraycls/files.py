"""The one home of file writing: atomic files and folders, JSON (NaN-safe), PNG figures.

Every file the package writes appears whole or not at all: the content goes to a uniquely named temporary
beside the target (same folder, so the same file system), which `os.replace` then renames over the target
(a link planted at the target is replaced, never written through). Any error removes the temporary and
leaves the old target, if any, untouched. The temporary is made by the writer with an ordinary `open`, so
the file gets the umask's mode (mkstemp would make it 0600).

JSON has no NaN or infinity (Python's `json` writes them as bare ``NaN``, which strict parsers reject), and
a metric such as the AUROC of a label with no positives is NaN: `to_jsonable` turns every non-finite number
into ``null``, and tensors, NumPy values, paths and dataclasses into plain Python.

`check_output_file` / `check_output_dir` say, before a job starts, whether an output location can be
written (and a folder where a file is expected is refused), so a command fails in one line before any
work rather than after it.

A leaf: imports nothing of xraycls, and neither torch, NumPy nor matplotlib at import (see `_convert`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import math
import os
import shutil
import sys
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import Any

__all__ = [
    "atomic_path",
    "atomic_dir",
    "write_bytes",
    "write_text",
    "write_json",
    "to_jsonable",
    "save_png",
    "check_output_file",
    "check_output_dir",
]


def _sibling(target: Path, suffix: str) -> Path:
    return target.with_name(f".{target.name}.{uuid.uuid4().hex}.{suffix}")


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """A fresh temporary path beside `target` for the body to write; renamed over `target` when the body
    ends without error, deleted on any error (and on KeyboardInterrupt). Parent folders are created."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """A fresh empty folder beside `target` for the body to fill; it then replaces `target` (an existing
    one is moved aside first and deleted after, or put back if the swap fails). Any error removes it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if target.exists():
            old = _sibling(target, "old")
            target.rename(old)
        try:
            tmp.rename(target)
        except BaseException:
            if old is not None:
                old.rename(target)  # put the previous folder back
            raise
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_bytes(path: str | Path, data: bytes, *, fsync: bool = False) -> Path:
    """Write `data` to `path` atomically; `fsync` also flushes it to disk before the rename (a crash then
    leaves the old file or the new one, never an empty one). Returns `path`."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "xb") as handle:
        handle.write(data)
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())
    return path


def write_text(path: str | Path, text: str, *, encoding: str = "utf-8", fsync: bool = False) -> Path:
    """`write_bytes` of `text` encoded (UTF-8 by default). Returns `path`."""
    return write_bytes(path, text.encode(encoding), fsync=fsync)


def write_json(path: str | Path, payload: Any) -> Path:
    """Write `to_jsonable(payload)` to `path` (indent 2, UTF-8, strict JSON), atomically and flushed to disk,
    so a reader never sees half a file. Parent folders are created. Returns `path`."""
    text = json.dumps(to_jsonable(payload), indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    return write_text(path, text, fsync=True)


def save_png(fig: Any, out: str | Path, **savefig: Any) -> Path:
    """Write a `matplotlib.figure.Figure` to `out` as PNG, atomically. The figure gets its own Agg canvas
    (no pyplot, no global matplotlib state); `savefig` keywords (dpi, bbox_inches, metadata) pass through."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = Path(out)
    FigureCanvasAgg(fig)  # attaches the Agg canvas to this figure only
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", **savefig)
    return out


def to_jsonable(obj: Any) -> Any:
    """`obj` as plain JSON values: dict (str keys), list, str, int, float, bool, None.

    Tensors and NumPy arrays become (nested) lists, their scalars Python numbers; NaN and +-inf become None;
    paths become strings, enums their values, dates ISO strings, dataclasses dicts, sets sorted lists.
    Raises TypeError naming where in `obj` (e.g. ``metrics.test.model``) a value of another type sits.
    """
    return _convert(obj, "")


def _convert(obj: Any, where: str) -> Any:
    # A tensor or an ndarray exists only once its library is imported: look there, never import it here.
    torch, np = sys.modules.get("torch"), sys.modules.get("numpy")
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, enum.Enum):
        return _convert(obj.value, where)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if torch is not None and isinstance(obj, torch.Tensor):
        return _convert(obj.detach().cpu().tolist(), where)
    if np is not None and isinstance(obj, (np.ndarray, np.generic)):
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


def check_output_file(path: str | Path, setting: str) -> Path:
    """Raise ValueError, naming `setting` (e.g. ``--out``) and `path`, unless a file can be written at `path`:
    it must not be a folder, and its folder must exist and be writable or be creatable. Nothing is created.
    Returns `path`."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{setting} {path}: is a folder; give a file name")
    _check_can_create(path.parent, path, setting)
    return path


def check_output_dir(path: str | Path, setting: str) -> Path:
    """Raise ValueError, naming `setting` and `path`, unless files can be written in the folder `path`: it is
    a writable folder, or does not exist and can be created. Nothing is created. Returns `path`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{setting} {path}: exists and is not a folder")
    _check_can_create(path, path, setting)
    return path


def _check_can_create(folder: Path, target: Path, setting: str) -> None:
    """`folder` exists and is writable, or its deepest existing ancestor is a writable folder."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{setting} {target}: cannot be created: {existing} is a file, not a folder")
    flags = os.W_OK | os.X_OK
    effective = os.access in os.supports_effective_ids
    if not os.access(existing, flags, effective_ids=effective):
        raise ValueError(f"{setting} {target}: cannot write in {existing} (permission denied)")
    # os.access answers from mode bits and read-only mounts; an NFS root_squash, ACL or security module
    # can still say no, so one empty file is made and removed to be sure.
    probe = existing / f".xraycls-probe-{uuid.uuid4().hex}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as error:
        raise ValueError(f"{setting} {target}: cannot write in {existing} ({error.strerror})") from None
    probe.unlink(missing_ok=True)
