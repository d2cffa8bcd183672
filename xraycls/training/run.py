"""One training run from a composed Hydra config, in four phases: build, fit, evaluate, export.

`build` turns the config into parts (hardware plan, DataModule, callbacks, loggers, Trainer) and stops on a
wrong setting before any data or weights; `fit` prepares the data and trains; `evaluate` validates and tests
the best checkpoint, gathered over every rank; `export` writes the model bundle, the plots and summary.json
(rank 0). Like the template's `src/utils`, this package is the one place besides the CLI that reads Hydra
configs; every part comes from `hydra.utils.instantiate`, so each works without Hydra too.

Run directory (`paths.output_dir`): summary.json, metrics.csv, checkpoints/{best-*,last}.ckpt, model/,
plots/*.png, predictions_test.csv, config.yaml (the resolved config).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from omegaconf import DictConfig, OmegaConf

from xraycls.files import write_json, write_text
from xraycls.findings import LABELS
from xraycls.hardware.plan import HardwarePlan
from xraycls.hardware.threads import apply_cpu_threads
from xraycls.model.checkpoint import open_checkpoint
from xraycls.model.module import XrayClassifier, pos_weight_from_prevalence
from xraycls.training.artifacts import export_model, gathered_test_ids, write_plots, write_test_predictions
from xraycls.training.callbacks import best_checkpoint_callback, instantiate_callbacks
from xraycls.training.config import (
    find_resume_checkpoint,
    hardware_arguments,
    hardware_plan,
    instantiate,
    instantiate_group,
    ipu_settings,
    threshold_settings,
)
from xraycls.training.outputs import gathered_outputs
from xraycls.training.preparation import preparation_timing
from xraycls.training.settings import (
    check_model_source,
    check_settings,
    finished_summary,
    set_aside,
    setting_errors,
)
from xraycls.training.summary import (
    SUMMARY_NAME,
    calibration_block,
    ci_block,
    collect_versions,
    eval_settings,
    metrics_block,
    run_thresholds,
)
from xraycls.training.timing import RunTimer

__all__ = [
    "TrainingRun",
    "Evaluation",
    "build",
    "fit",
    "require_trained",
    "evaluate",
    "export",
    "run_training",
]

log = logging.getLogger(__name__)

Outputs = tuple[np.ndarray, np.ndarray]  # probabilities and labels, float32 [N, 15] each


@dataclass
class TrainingRun:
    """The built parts of one run, before any data is read."""

    cfg: DictConfig
    run_dir: Path
    plan: HardwarePlan
    datamodule: Any  # NIHDataModule, or any DataModule the data config names
    trainer: L.Trainer
    thresholds: dict[str, Any]  # threshold_settings(cfg)
    resume: Path | None
    started: float  # time.perf_counter() at the start
    started_at: float  # time.time() at the start


@dataclass
class Evaluation:
    """The best checkpoint's validation and test results, gathered over every rank."""

    best_checkpoint: str | None
    val_metrics: dict | None
    val_outputs: Outputs | None
    test_metrics: dict | None
    test_outputs: Outputs | None


def run_training(cfg: DictConfig) -> dict:
    """Fit, validate and test the best checkpoint, export and plot; returns the summary written to disk.

    Raises `SettingsError` before any work for a setting or input that cannot work. A finished run (its
    summary.json exists) is left untouched and its summary returned, unless `overwrite=true`, which moves
    its files aside (`replaced_<time>/`) and starts it over.
    """
    check_settings(cfg)
    run_dir = Path(cfg.paths.output_dir)
    finished = finished_summary(run_dir)
    if finished is not None and not cfg.get("overwrite"):
        log.info(
            "run %s is finished (its summary: %s); nothing to do (overwrite=true starts it over)",
            run_dir,
            run_dir / SUMMARY_NAME,
        )
        return finished
    run = build(cfg)
    if finished is not None:
        set_aside(run_dir)
    model = fit(run)
    require_trained(run)
    evaluation = evaluate(run, model)
    summary = summarise(run, evaluation)
    export(run, model, evaluation, summary)
    for logger in run.trainer.loggers:
        if hasattr(logger, "close"):
            logger.close()
    return summary


def build(cfg: DictConfig) -> TrainingRun:
    """Every part of the run, then the run directory with config.yaml and the seed; a wrong setting or
    input raises `SettingsError` before anything is written."""
    started, started_at = time.perf_counter(), time.time()
    run_dir = Path(cfg.paths.output_dir)
    with setting_errors():  # anything wrong here is a setting or an input: one line, no work done
        thresholds = threshold_settings(cfg)
        eval_settings(cfg)
        plan = hardware_plan(cfg)
        hardware_args = hardware_arguments(cfg, plan)
        check_model_source(cfg)
        datamodule = instantiate(cfg.data, batch_size=plan.loader_batch)
        datamodule.check_sources()
        resume = find_resume_checkpoint(
            cfg.get("ckpt_path"), run_dir, Path(cfg.paths.runs_dir), str(cfg.task_name)
        )
        if resume is not None and not (cfg.get("overwrite") and resume.is_relative_to(run_dir)):
            open_checkpoint(resume)  # refuses a file that would run code, before Lightning opens it
        trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
        for key in hardware_args:  # passed as objects below, not merged into the config
            trainer_cfg.pop(key, None)
        callbacks = instantiate_callbacks(cfg)
        loggers = instantiate_group(cfg.get("logger"))
        trainer: L.Trainer = instantiate(
            trainer_cfg, callbacks=callbacks, logger=loggers or False, **hardware_args
        )
    if cfg.get("overwrite") and resume is not None and resume.is_relative_to(run_dir):
        resume = None  # overwrite=true starts over: its own last.ckpt is set aside, not resumed
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = apply_cpu_threads(plan)  # torch's intra-op threads, recorded in summary.json's hardware block
    L.seed_everything(cfg.seed, workers=True)
    run = TrainingRun(cfg, run_dir, plan, datamodule, trainer, thresholds, resume, started, started_at)
    write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    return run


def fit(run: TrainingRun) -> XrayClassifier:
    """Prepare the data (the cache, once), build the model, train (resuming where a checkpoint says)."""
    cfg, datamodule, trainer = run.cfg, run.datamodule, run.trainer
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    datamodule.prepare_data()
    datamodule.setup("fit")
    overrides: dict[str, Any] = {}
    if cfg.get("pos_weight_from_data"):
        overrides["pos_weight"] = pos_weight_from_prevalence(datamodule.train_label_prevalence())
    model: XrayClassifier = instantiate(cfg.model, **overrides)
    if run.plan.accelerator == "ipu":
        from xraycls.hardware.ipu import annotate_pipeline

        recompute = ipu_settings(cfg).get("recompute", True)
        annotate_pipeline(model.backbone, run.plan.layers_per_ipu, recompute=recompute)
    if run.resume is not None:
        log.info("resuming from %s", run.resume)
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(run.resume) if run.resume else None)
    return model


def require_trained(run: TrainingRun) -> None:
    """A fit that took no optimizer step (e.g. fewer batches than one accumulation) must not ship a model."""
    if run.trainer.global_step == 0:
        raise RuntimeError(
            f"run {run.run_dir}: the fit took no optimizer step (trainer.limit_train_batches, "
            "accumulation or the data size); no model is exported from untrained weights"
        )


def evaluate(run: TrainingRun, model: XrayClassifier) -> Evaluation:
    """Validate (and, with `test`, test) the best checkpoint; a collective: call it on every rank."""
    trainer, datamodule = run.trainer, run.datamodule
    checkpoint = best_checkpoint_callback(trainer.callbacks, str(run.cfg.optimized_metric))
    best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    if best is not None:
        open_checkpoint(best)  # every checkpoint Lightning opens is read safely first (the legacy stack)
    # Validate the best checkpoint again so summary's val metrics belong to the exported weights.
    trainer.validate(model, datamodule=datamodule, ckpt_path=best, verbose=False)
    val_metrics = model.last_metrics.get("val")
    val_outputs = gathered_outputs(trainer, model, "val")
    test_metrics = test_outputs = None
    if run.cfg.get("test"):
        trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)
        test_metrics = model.last_metrics.get("test")
        test_outputs = gathered_outputs(trainer, model, "test")
    return Evaluation(best, val_metrics, val_outputs, test_metrics, test_outputs)


def summarise(run: TrainingRun, evaluation: Evaluation) -> dict[str, Any]:
    """summary.json's content (DESIGN.md's contract) but `model_dir`, `plots` and `timing.total`."""
    cfg, datamodule = run.cfg, run.datamodule
    data_summary = datamodule.data_summary()
    split_name = data_summary["split"]
    summary: dict[str, Any] = {
        "task_name": str(cfg.task_name),
        "run_dir": str(run.run_dir),
        "optimized_metric": str(cfg.optimized_metric),
        "best_checkpoint": evaluation.best_checkpoint,
        "resumed_from": str(run.resume) if run.resume else None,
        "metrics": {
            "val": metrics_block(evaluation.val_metrics, split_name),
            "test": metrics_block(evaluation.test_metrics, split_name),
        },
        "hardware": run.plan.to_dict(),
        "data": data_summary,
        "labels": list(LABELS),
        "versions": collect_versions(),
        "shuffled_train_labels": bool(cfg.get("shuffle_train_labels")),
    }
    summary["thresholds"] = run_thresholds(evaluation.val_outputs, run.thresholds, split_name)
    if run.trainer.is_global_zero:  # what only rank 0 writes: intervals and temperatures
        settings = eval_settings(cfg)
        outputs = evaluation.test_outputs
        ids = (
            None
            if outputs is None
            else gathered_test_ids(datamodule, run.trainer.world_size, len(outputs[0]))
        )
        if summary["metrics"]["test"] is not None and ids is not None:
            summary["metrics"]["test"]["ci"] = ci_block(outputs, ids[1], settings)
        summary["calibration"] = calibration_block(
            evaluation.val_outputs, evaluation.test_outputs, settings, split_name
        )
    timer = next(cb for cb in run.trainer.callbacks if isinstance(cb, RunTimer))  # instantiate_callbacks
    summary.update(timer.as_dict())
    # Download, extraction and cache seconds come from their reports: paid once per dataset, not per run.
    dhp = datamodule.hparams
    preparation, summary["preparation"] = preparation_timing(
        dhp.root, dhp.cache_dir, dhp.image_size, source=dhp.source, run_started_at=run.started_at
    )
    summary["timing"].update(preparation)
    return summary


def export(run: TrainingRun, model: XrayClassifier, evaluation: Evaluation, summary: dict) -> None:
    """On rank 0: model/ and plots/ (as configured), then summary.json (with the loggers' `summary_entries`),
    then the loggers' run summary with the test outputs."""
    if not run.trainer.is_global_zero:
        return
    if run.cfg.get("export_model"):
        summary["model_dir"] = str(export_model(run.run_dir, model, run.datamodule, summary))
    if run.cfg.get("plots"):
        summary["plots"] = write_plots(run.run_dir, evaluation.test_outputs, run.datamodule)
    outputs = evaluation.test_outputs
    ids = (
        None
        if outputs is None
        else gathered_test_ids(run.datamodule, run.trainer.world_size, len(outputs[0]))
    )
    if ids is not None:
        split = run.datamodule.data_summary()["split"]
        summary["predictions_test"] = str(
            write_test_predictions(run.run_dir, evaluation.test_outputs, ids, split)
        )
    summary["timing"]["total"] = time.perf_counter() - run.started
    for logger in run.trainer.loggers:  # e.g. wandb_run_id: a sweep's record links each trial to its run
        if hasattr(logger, "summary_entries"):
            summary.update(logger.summary_entries())
    write_json(run.run_dir / SUMMARY_NAME, summary)
    for logger in run.trainer.loggers:
        if hasattr(logger, "log_run_summary"):
            logger.log_run_summary(summary, test_outputs=evaluation.test_outputs)
