"""xraycls's Hydra plugins: Hydra instantiates a sweeper only from a class under `hydra_plugins`.

Found when the project root is on sys.path, as it is for `python train.py` (the script's folder).
"""

from xraycls.experiment.optuna_sweeper import ResumableOptunaSweeper as _ResumableOptunaSweeper

__all__ = ["ResumableOptunaSweeper"]


class ResumableOptunaSweeper(_ResumableOptunaSweeper):
    """`hydra.sweeper._target_` of conf/hparams_search/optuna.yaml; see xraycls.experiment.optuna_sweeper."""
