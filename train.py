"""Train and evaluate: `python train.py [experiment=...] [group=variant] [key=value ...]`.

Fits, validates and tests the best checkpoint, and writes the run directory (see xraycls/training/run.py).
Returns `optimized_metric` (validation) so Hydra sweeps (`-m`, Optuna) can optimise it.
"""

from __future__ import annotations

import logging
import math

import hydra
from omegaconf import DictConfig

log = logging.getLogger("xraycls.train")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from xraycls.training import run_training  # after Hydra parsed the command line: --help stays fast

    summary = run_training(cfg)
    stage, _, name = str(cfg.optimized_metric).partition("/")
    value = (summary["metrics"].get(stage) or {}).get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        log.warning("optimized_metric %s was not measured in this run", cfg.optimized_metric)
        return None
    log.info("%s = %.4f (run directory: %s)", cfg.optimized_metric, value, summary["run_dir"])
    return float(value)


if __name__ == "__main__":
    main()
