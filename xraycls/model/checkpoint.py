"""Open a Lightning checkpoint without running code from it, on every stack the project supports.

torch >= 2.6 loads with `weights_only=True` by default, but the legacy IPU stack (torch 2.0.1, Lightning
2.0.9) calls `torch.load` without it, so a crafted `.ckpt` would run its payload there. Every checkpoint
the project hands to Lightning (resume, `ckpt_path=`, best-checkpoint reloads, `load_from_checkpoint`) goes
through `open_checkpoint` first: a restricted unpickler (tensors, plain containers, numbers, strings) reads
it, and anything that needs more is refused before Lightning touches the file.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "open_checkpoint"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be opened safely; the message names the file and what to do."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1].strip() if text else type(error).__name__


def _unpickler_reason(error: BaseException) -> str:
    """torch's restricted unpickler puts its reason after "WeightsUnpickler error:" in a long message."""
    text = str(error)
    for marker in ("WeightsUnpickler error:", "trusted source."):
        _, found, rest = text.partition(marker)
        lines = [line.strip() for line in rest.splitlines() if line.strip() and "file an issue" not in line]
        if found and lines:
            return lines[0]
    return _first_line(error)


def _builds_objects(error: BaseException) -> bool:
    """Whether the restricted unpickler stopped at an object to build (code to run), not at garbage.

    torch 2.0 says "Unsupported class os.makedirs"; torch 2.6+ "unsupported GLOBAL os.makedirs ...".
    """
    text = str(error).lower()
    return "unsupported class" in text or "global" in text


def _fallbacks(path: Path) -> str:
    """For an unreadable last.ckpt: the best checkpoints beside it, which a run can resume from instead."""
    if path.name != "last.ckpt":
        return ""
    best = sorted(path.parent.glob("best-*.ckpt"))
    if not best:
        return ""
    return f"; resume from an earlier one instead: ckpt_path={best[-1]}"


def open_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents, read with `torch.load(weights_only=True)` onto the CPU.

    Raises FileNotFoundError for a missing file and CheckpointError (a ValueError) for a file that holds
    other objects (it would execute code when unpickled), a truncated or foreign file, or one that is not a
    mapping. The file is never unpickled by the full unpickler here.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        contents = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _unpickler_reason(error)
        if not _builds_objects(error):
            raise CheckpointError(
                f"checkpoint {path}: unreadable, truncated or not a PyTorch checkpoint ({reason})"
                f"{_fallbacks(path)}"
            ) from None
        raise CheckpointError(
            f"checkpoint {path}: refused, it holds objects other than tensors and plain containers and "
            f"opening it would run code from the file ({reason}); use a checkpoint xraycls wrote, or "
            "weights as .safetensors"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(
            f"checkpoint {path}: unreadable, truncated or not a PyTorch checkpoint ({_first_line(error)})"
            f"{_fallbacks(path)}"
        ) from None
    if not isinstance(contents, dict):
        raise CheckpointError(
            f"checkpoint {path}: holds a {type(contents).__name__}, not a checkpoint mapping"
        )
    return contents
