"""The project's error for a setting or input that stops a job before any work (imports nothing).

Entry points (`train.py`, the `xraycls` commands) print it as one line naming the setting and exit with
status 2; it lives here, apart from the code that raises it, so they can catch it without importing torch.
"""

from __future__ import annotations

__all__ = ["SettingsError"]


class SettingsError(ValueError):
    """A setting or input that stops a run before any work; the message names it in one line."""
