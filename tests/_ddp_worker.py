"""Run by tests/test_ddp.py as `python tests/_ddp_worker.py DATA_DIR RUN_DIR [overrides]`: the demo config on
two CPU processes (DDP over gloo) through `run_training`. Lightning's DDP launcher starts rank 1 by running
this same command again, so everything happens under the main guard."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    torch.set_num_threads(1)  # two ranks on a shared 2-core box: OpenMP spinning would starve the other
    from xraycls.training import run_training

    data_dir, run_dir, *extra = sys.argv[1:]
    overrides = [
        "experiment=demo",
        f"paths.data_dir={data_dir}",
        f"paths.runs_dir={data_dir}/runs",
        f"paths.output_dir={run_dir}",
        "hardware.devices=2",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    run_training(cfg)


if __name__ == "__main__":
    main()
