"""Small file helpers for sweep folders: atomic replace, and appends under an exclusive lock.

Trials of one sweep can end at the same moment in different processes (submitit runs each trial in its
own), so every change to the record happens under one `fcntl` lock per sweep folder.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["write_atomic", "write_text_atomic", "locked", "append_line"]


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Let `write(tmp)` fill a temporary file beside `path`, then rename it over `path` (`os.replace`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """`text` (UTF-8) to `path`, flushed to disk before the rename: a reader sees the old file or the new."""

    def write(tmp: Path) -> None:
        with open(tmp, "x", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    return write_atomic(path, write)


@contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `lock_path` (created if missing) for the duration of the block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def append_line(path: Path, line: str) -> None:
    """Append one line and fsync it; call it under `locked` when several processes write the file."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")
        handle.flush()
        os.fsync(handle.fileno())
