"""Train and evaluate: `python train.py [experiment=...] [group=variant] [key=value ...]`.

Fits, validates and tests the best checkpoint, and writes the run directory (see xraycls/training/run.py).
Returns `optimized_metric` (validation) so Hydra sweeps (`-m`, Optuna) can optimise it.

A wrong setting or input (an unknown key, a bad value, a missing cache, a checkpoint that would run code)
prints one line, `train.py: error: <message>`, exits with status 2 and leaves no run folder; a bug still
shows its traceback. HYDRA_FULL_ERROR=1 shows the traceback of setting errors too.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig

from xraycls.errors import SettingsError, one_line

log = logging.getLogger("xraycls.train")

# Hydra's own errors for a command line it cannot compose (unknown group, option or key, bad syntax).
_COMPOSITION_ERRORS = (ConfigCompositionException, MissingConfigException, OverrideParseException)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from xraycls.training import run_training  # after Hydra parsed the command line: --help stays fast
    from xraycls.training.settings import remove_unstarted_run_dir

    try:
        summary = run_training(cfg)
    except SettingsError as error:
        remove_unstarted_run_dir(Path(cfg.paths.output_dir))
        if HydraConfig.get().mode == RunMode.MULTIRUN or _show_traceback():
            raise  # a sweep records the refused trial and goes on (xraycls.experiment.record)
        # A single run: exit here, before Hydra adds its own "Error executing job" line.
        print(f"train.py: error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
    stage, _, name = str(cfg.optimized_metric).partition("/")
    value = (summary["metrics"].get(stage) or {}).get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        log.warning("optimized_metric %s was not measured in this run", cfg.optimized_metric)
        return None
    log.info("%s = %.4f (run directory: %s)", cfg.optimized_metric, value, summary["run_dir"])
    return float(value)


def _show_traceback() -> bool:
    return os.environ.get("XRAYCLS_FULL_ERROR") == "1"


def run() -> int:
    """`main` with setting errors as one line on stderr and exit status 2."""
    # The user's HYDRA_FULL_ERROR=1 asks for tracebacks; ours makes Hydra raise instead of printing its own
    # multi-line report, so the choice travels to the job (and submitit's) as XRAYCLS_FULL_ERROR.
    os.environ.setdefault("XRAYCLS_FULL_ERROR", "1" if os.environ.get("HYDRA_FULL_ERROR") == "1" else "0")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (SettingsError, *_COMPOSITION_ERRORS) as error:
        if _show_traceback():
            raise
        print(f"train.py: error: {one_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
