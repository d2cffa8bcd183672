"""A resumable Optuna sweeper: `hydra.sweeper.n_trials` is the study's total, so a relaunch continues.

hydra-optuna-sweeper 1.3.0 runs `n_trials` new trials on every launch and numbers its jobs from 0 again
(trial folders collide). This one, with the same study in `hydra.sweeper.storage`:
- marks trials left RUNNING by a killed sweep as FAIL (`INTERRUPTED`, in the study and in trials.csv);
- runs only the trials still missing: n_trials minus the finished ones (COMPLETE, PRUNED or genuinely
  FAILED; interrupted trials do not count, so a killed trial is run again with new parameters);
- gives each job the study's trial number as `hydra.job.num`, so `trial_${hydra.job.num}` never collides;
- reseeds a seeded sampler with seed + trials already in the study, so a relaunch does not replay the
  first launch's random start-up samples;
- records a failed trial's reason in its user attribute `fail_reason`, and checks `max_failure_rate` per
  batch of `n_jobs` as upstream does (with n_jobs 1, any value < 1.0 stops at the first failure).
One sweeper process per study: a RUNNING trial at launch is taken to be a leftover, never a live one.

Hydra instantiates sweepers only from the `hydra_plugins` namespace: conf/hparams_search/optuna.yaml names
`hydra_plugins.xraycls_sweeper.ResumableOptunaSweeper`, a thin subclass of this class. Importing this
module stays cheap (Hydra scans plugins on every run): optuna is imported when a sweep starts.
"""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

__all__ = ["ResumableOptunaSweeper"]


class ResumableOptunaSweeper(Sweeper):
    """Takes the arguments of hydra-optuna-sweeper's OptunaSweeper (its config schema is reused)."""

    def __init__(
        self,
        sampler: Any,
        direction: Any,
        storage: Any | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        search_space: DictConfig | None,
        custom_search_space: str | None,
        params: DictConfig | None,
    ) -> None:
        from xraycls.experiment._optuna_impl import ResumableOptunaSweeperImpl

        self.sweeper = ResumableOptunaSweeperImpl(
            sampler,
            direction,
            storage,
            study_name,
            n_trials,
            n_jobs,
            max_failure_rate,
            search_space,
            custom_search_space,
            params,
        )

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)
