"""The sweep loop of `ResumableOptunaSweeper` (see xraycls.experiment.optuna_sweeper for the behaviour).

It reuses hydra-optuna-sweeper 1.3.0's parsing of the search space and its trial configuration, and
replaces only `sweep`: upstream's loop counts trials per launch and numbers jobs from 0.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobReturn
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import OmegaConf
from optuna.trial import TrialState

from xraycls.experiment.record import INTERRUPTED, failure_reason, mark_interrupted

__all__ = ["ResumableOptunaSweeperImpl", "FAIL_REASON"]

log = logging.getLogger(__name__)

FAIL_REASON = "fail_reason"  # trial user attribute holding why it failed
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class ResumableOptunaSweeperImpl(OptunaSweeperImpl):
    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        self._process_searchspace_config()
        params_conf = self._parse_sweeper_params_config()
        params_conf.extend(arguments)
        distributions, fixed_params = create_params_from_overrides(params_conf)
        if self.search_space_distributions:
            distributions = {**self.search_space_distributions, **distributions}
        grid_sampler = optuna.samplers.GridSampler
        is_grid = isinstance(self.sampler, functools.partial) and self.sampler.func is grid_sampler
        if is_grid:
            grid = {name: self._to_grid_sampler_choices(dist) for name, dist in distributions.items()}
            self.sampler = self.sampler(grid)
            self.n_trials = min(self.n_trials, _product(len(choices) for choices in grid.values()))
        for name in fixed_params:
            distributions.pop(name, None)
        directions = self._get_directions()
        if len(directions) != 1:
            raise ValueError(f"hydra.sweeper.direction: train.py returns one objective, got {directions}")

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)  # sqlite makes the file, not its folder
        sampler = self.sampler if is_grid else self._reseeded_sampler(_existing_trials(self))
        study = optuna.create_study(
            study_name=self.study_name,
            storage=self.storage,
            sampler=sampler,
            directions=directions,
            load_if_exists=True,
        )
        interrupted = _fail_interrupted(study)
        if interrupted:
            log.warning("trials %s were left RUNNING by a stopped sweep: marked FAIL", interrupted)
            mark_interrupted(sweep_dir, interrupted)
        done = sum(1 for trial in study.trials if _counts(trial))
        to_go = self.n_trials - done
        log.info(
            "Study %s in %s: %d trials finished, %d to go (n_trials=%d is the study's total)",
            study.study_name,
            self.storage,
            done,
            max(to_go, 0),
            self.n_trials,
        )

        while to_go > 0:
            batch = min(to_go, self.n_jobs)
            trials = [study.ask() for _ in range(batch)]
            numbers = [trial.number for trial in trials]
            if numbers != list(range(numbers[0], numbers[0] + batch)):
                raise RuntimeError(f"study {study.study_name}: trial numbers {numbers} are not consecutive")
            overrides = self._configure_trials(trials, distributions, fixed_params)
            returns = self.launcher.launch(overrides, initial_job_idx=numbers[0])
            failures = [_tell(study, trial, ret, is_grid) for trial, ret in zip(trials, returns, strict=True)]
            failures = [reason for reason in failures if reason is not None]
            if len(failures) / len(returns) > self.max_failure_rate:
                log.error(
                    "%d of %d trials failed in this batch; max_failure_rate=%s stops the sweep",
                    len(failures),
                    len(returns),
                    self.max_failure_rate,
                )
                for ret in returns:
                    _ = ret.return_value  # re-raises the failed job's exception with its traceback
            to_go -= batch
        self._save_results(study, sweep_dir)

    def _reseeded_sampler(self, offset: int) -> Any:
        """The configured sampler, made again with seed + offset if it is seeded and the study has trials."""
        assert self.config is not None
        sampler_cfg = OmegaConf.select(self.config, "hydra.sweeper.sampler")
        if sampler_cfg is None or OmegaConf.select(sampler_cfg, "seed", default=None) is None or offset == 0:
            return self.sampler
        return instantiate(sampler_cfg, seed=int(sampler_cfg.seed) + offset)

    def _save_results(self, study: optuna.Study, sweep_dir: Path) -> None:
        if not any(trial.state == TrialState.COMPLETE for trial in study.trials):
            log.warning("study %s has no complete trial: no optimization_results.yaml", study.study_name)
            return
        best = study.best_trial
        log.info("Best parameters: %s; best value: %s (trial %d)", best.params, best.value, best.number)
        results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")


def _existing_trials(sweeper: OptunaSweeperImpl) -> int:
    """How many trials the study already holds in its storage (0 for a new study or in-memory storage)."""
    if sweeper.storage is None:
        return 0
    summaries = optuna.study.get_all_study_summaries(storage=sweeper.storage)
    return next((s.n_trials for s in summaries if s.study_name == sweeper.study_name), 0)


def _counts(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.state in _FINISHED and trial.user_attrs.get(FAIL_REASON) != INTERRUPTED


def _fail_interrupted(study: optuna.Study) -> list[int]:
    numbers = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # NOTE: optuna 2.10 has no public way to set a user attribute on a trial it did not ask for here.
        study._storage.set_trial_user_attr(trial._trial_id, FAIL_REASON, INTERRUPTED)
        study.tell(trial.number, state=TrialState.FAIL)
        numbers.append(trial.number)
    return numbers


def _tell(study: optuna.Study, trial: optuna.Trial, ret: JobReturn, is_grid: bool) -> str | None:
    """Report one job to the study; returns its failure reason, or None when it completed."""
    reason = failure_reason(ret)
    if reason is not None:
        trial.set_user_attr(FAIL_REASON, reason)
        study.tell(trial, state=TrialState.FAIL)
        log.warning("trial %d failed: %s", trial.number, reason)
        return reason
    try:
        study.tell(trial, state=TrialState.COMPLETE, values=[float(ret.return_value)])
    except RuntimeError as error:  # GridSampler stops the study once the grid is exhausted
        if not (is_grid and "Study.stop" in str(error)):
            raise
    return None


def _product(values: Any) -> int:
    total = 1
    for value in values:
        total *= value
    return total
