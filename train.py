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
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig

from xraycls.errors import SettingsError

log = logging.getLogger("xraycls.train")

# Hydra's own errors for a command line it cannot compose (unknown group, option or key, bad syntax).
_COMPOSITION_ERRORS = (ConfigCompositionException, MissingConfigException, OverrideParseException)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from xraycls.training import run_training  # after Hydra parsed the command line: --help stays fast
    from xraycls.training.settings import remove_unstarted_run_dir

    try:
        summary = run_training(cfg)
    except SettingsError:
        remove_unstarted_run_dir(Path(cfg.paths.output_dir))
        raise
    stage, _, name = str(cfg.optimized_metric).partition("/")
    value = (summary["metrics"].get(stage) or {}).get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        log.warning("optimized_metric %s was not measured in this run", cfg.optimized_metric)
        return None
    log.info("%s = %.4f (run directory: %s)", cfg.optimized_metric, value, summary["run_dir"])
    return float(value)


def _one_line(error: BaseException) -> str:
    # Hydra's composition messages span lines and end with the config search path: keep the first part.
    return " ".join(str(error).split("Config search path")[0].split())


def run() -> int:
    """`main` with setting errors as one line on stderr and exit status 2."""
    show_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing its own multi-line report
    try:
        main()
    except (SettingsError, *_COMPOSITION_ERRORS) as error:
        if show_traceback:
            raise
        print(f"train.py: error: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run())
