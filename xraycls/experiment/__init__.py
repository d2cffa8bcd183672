"""Across runs: the sweep record (`record`), the sweep report (`report`), the Optuna glue (`optuna_sweeper`).

Kept import-free: Hydra imports `optuna_sweeper` while it scans plugins on every `python train.py` call.
"""

__all__: list[str] = []
