"""The project's error for a setting or input that stops a job before any work (imports nothing).

Entry points (`train.py`, the `xraycls` commands) print it as one line naming the setting and exit with
status 2; it lives here, apart from the code that raises it, so they can catch it without importing torch.
"""

from __future__ import annotations

import os

__all__ = ["SettingsError", "one_line"]


class SettingsError(ValueError):
    """A setting or input that stops a run before any work; the message names it in one line."""


def one_line(error: BaseException) -> str:
    """The error as one line, for every entry point: an OSError of the system as 'path: reason' (its own
    `str` is "[Errno 13] Permission denied: 'path'"); Hydra's composition messages without the config
    search path they append."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        text = f"{os.fsdecode(error.filename)}: {error.strerror}"
        if error.filename2 is not None:
            text = f"{os.fsdecode(error.filename)} -> {os.fsdecode(error.filename2)}: {error.strerror}"
    else:
        text = (str(error) or type(error).__name__).split("Config search path")[0]
    return " ".join(text.split())
