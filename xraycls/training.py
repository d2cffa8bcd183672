"""One training run from a composed Hydra config: fit, validate and test the best checkpoint, write the run.

This is the entry point's engine (`train.py` stays thin); like the template's `src/utils`, it is the one
place besides the CLI that reads Hydra configs. Everything it builds (DataModule, LightningModule,
callbacks, loggers, Trainer) comes from `hydra.utils.instantiate`, so every part works without Hydra too.

Run directory (`paths.output_dir`): summary.json, metrics.csv, checkpoints/{best-*,last}.ckpt, model/,
plots/*.png, config.yaml (the resolved config).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from xraycls.findings import LABELS
from xraycls.inference.bundle import export_bundle
from xraycls.model.module import XrayClassifier, pos_weight_from_prevalence
from xraycls.report.plots import plot_roc_curves, plot_sample_grid, plot_training_curves
from xraycls.report.preparation import preparation_timing
from xraycls.report.summary import collect_versions, write_json
from xraycls.report.timing import RunTimer

__all__ = ["run_training", "resolve_precision", "find_resume_checkpoint", "SUMMARY_NAME"]

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"
_HEADLINE_KEYS = ("split", "loss", "auroc_macro14", "auroc_macro15", "auroc_seed_compat")


def resolve_precision(precision: str | int | None, accelerator: str) -> str:
    """`auto` -> bf16-mixed where a CUDA GPU will run the step, else 32-true; anything else unchanged."""
    if precision not in (None, "auto"):
        return str(precision)
    uses_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if uses_gpu else "32-true"


def find_resume_checkpoint(
    ckpt_path: str | None, run_dir: Path, runs_dir: Path, task_name: str
) -> Path | None:
    """The checkpoint to resume from, or None to start fresh.

    None: this run directory's checkpoints/last.ckpt if it exists (a rerun in the same directory resumes);
    "last": the newest last.ckpt among this task's runs that have no summary.json (unfinished);
    a path: that file, which must exist.
    """
    own_last = run_dir / "checkpoints" / "last.ckpt"
    if ckpt_path is None:
        return own_last if own_last.is_file() else None
    if ckpt_path == "last":
        candidates = [
            path
            for path in (runs_dir / task_name).glob("**/checkpoints/last.ckpt")
            if not (path.parent.parent / SUMMARY_NAME).exists()
        ]
        if not candidates:
            raise FileNotFoundError(
                f"ckpt_path=last: no unfinished run of task {task_name!r} with checkpoints/last.ckpt "
                f"under {runs_dir / task_name}"
            )
        return max(candidates, key=lambda path: path.stat().st_mtime)
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: no such checkpoint file")
    return path


def instantiate(node: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate` with plain containers, re-raising a constructor's own ValueError or
    FileNotFoundError, so a wrong setting reads as one line naming it, not a wrapped Hydra error."""
    try:
        return hydra_instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, ValueError | FileNotFoundError):
            raise error.__cause__ from None
        raise


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def _hardware_summary(trainer: L.Trainer, datamodule: Any) -> dict:
    accumulation = int(trainer.accumulate_grad_batches)
    micro = int(datamodule.per_device_batch)
    return {
        "accelerator": type(trainer.accelerator).__name__.replace("Accelerator", "").lower(),
        "devices": int(trainer.num_devices),
        "nodes": int(trainer.num_nodes),
        "replicas": int(trainer.world_size),
        "micro_batch": micro,
        "accumulation": accumulation,
        "global_batch": micro * int(trainer.world_size) * accumulation,
        "precision": str(trainer.precision),
        "strategy": type(trainer.strategy).__name__,
    }


def _build_model(cfg: DictConfig, datamodule: Any) -> XrayClassifier:
    overrides: dict[str, Any] = {}
    if cfg.get("pos_weight_from_data"):
        overrides["pos_weight"] = pos_weight_from_prevalence(datamodule.train_label_prevalence())
    return instantiate(cfg.model, **overrides)


def _write_plots(run_dir: Path, module: XrayClassifier, datamodule: Any) -> list[str]:
    plots_dir = run_dir / "plots"
    written = [str(path) for path in plot_training_curves(run_dir / "metrics.csv", plots_dir)]
    test_outputs = module.test_outputs()
    if test_outputs is not None:
        probs, labels = test_outputs
        written.append(
            str(plot_roc_curves(probs, labels, plots_dir / "roc_test.png", title="ROC, test split"))
        )
    train = datamodule.datasets["train"]
    count = min(9, len(train))
    images = np.stack([train[i][0].numpy() for i in range(count)])
    labels = np.stack([train[i][1].numpy() for i in range(count)])
    written.append(
        str(plot_sample_grid(images, labels, plots_dir / "train_samples.png", title="training images"))
    )
    return written


def _metrics_block(values: dict | None, split: str) -> dict | None:
    if values is None:
        return None
    return {"split": split, **values}


def run_training(cfg: DictConfig) -> dict:
    """Fit, validate and test the best checkpoint, export and plot; returns the summary written to disk."""
    started, started_at = time.perf_counter(), time.time()
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)

    # Every constructor validates its settings, so a wrong config stops here, before data or weights.
    datamodule = instantiate(cfg.data)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["precision"] = resolve_precision(trainer_cfg.get("precision"), trainer_cfg["accelerator"])
    callbacks = _instantiate_group(cfg.get("callbacks"))
    loggers = _instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)
    resume = find_resume_checkpoint(
        cfg.get("ckpt_path"), run_dir, Path(cfg.paths.runs_dir), str(cfg.task_name)
    )

    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = _build_model(cfg, datamodule)
    if resume is not None:
        log.info("resuming from %s", resume)
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume) if resume else None)

    checkpoint = next((cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)), None)
    best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    # Validate the best checkpoint again so summary's val metrics belong to the exported weights.
    trainer.validate(model, datamodule=datamodule, ckpt_path=best, verbose=False)
    val_metrics = model.last_metrics.get("val")
    test_metrics = None
    if cfg.get("test"):
        trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)
        test_metrics = model.last_metrics.get("test")

    data_summary = datamodule.data_summary()
    split_name = data_summary["split"]
    summary: dict[str, Any] = {
        "task_name": str(cfg.task_name),
        "run_dir": str(run_dir),
        "optimized_metric": str(cfg.optimized_metric),
        "best_checkpoint": best,
        "resumed_from": str(resume) if resume else None,
        "metrics": {
            "val": _metrics_block(val_metrics, split_name),
            "test": _metrics_block(test_metrics, split_name),
        },
        "hardware": _hardware_summary(trainer, datamodule),
        "data": data_summary,
        "labels": list(LABELS),
        "versions": collect_versions(),
        "shuffled_train_labels": bool(cfg.get("shuffle_train_labels")),
    }
    timer = next((cb for cb in trainer.callbacks if isinstance(cb, RunTimer)), None)
    if timer is not None:
        summary.update(timer.as_dict())
    # Download, extraction and cache seconds come from their reports: paid once per dataset, not per run.
    dhp = datamodule.hparams
    preparation, summary["preparation"] = preparation_timing(
        dhp.root, dhp.cache_dir, dhp.image_size, source=dhp.source, run_started_at=started_at
    )
    summary.setdefault("timing", {}).update(preparation)
    if trainer.is_global_zero:
        if cfg.get("export_model"):
            summary["model_dir"] = str(_export(run_dir, model, datamodule, summary))
        if cfg.get("plots"):
            summary["plots"] = _write_plots(run_dir, model, datamodule)
        summary.setdefault("timing", {})["total"] = time.perf_counter() - started
        write_json(run_dir / SUMMARY_NAME, summary)
        for logger in trainer.loggers:
            if hasattr(logger, "log_run_summary"):
                logger.log_run_summary(summary)
    for logger in trainer.loggers:
        if hasattr(logger, "close"):
            logger.close()
    return summary


def _export(run_dir: Path, model: XrayClassifier, datamodule: Any, summary: dict) -> Path:
    hp, dhp = model.hparams, datamodule.hparams
    kwargs = {
        "num_classes": hp.num_classes,
        "img_size": hp.img_size,
        "patch_size": hp.patch_size,
        "global_pool": hp.get("global_pool"),
    }
    preprocessing = {
        "image_size": dhp.image_size,
        "input_size": dhp.input_size,
        "mean": dhp.mean,
        "std": dhp.std,
        "channels": 3,
    }
    headline = {
        part: {
            key: block[key] for key in ("split", "loss", "auroc_macro14", "auroc_seed_compat") if key in block
        }
        for part, block in summary["metrics"].items()
        if block
    }
    return export_bundle(
        model.backbone,
        run_dir / "model",
        backbone_name=hp.backbone,
        backbone_kwargs={k: v for k, v in kwargs.items() if v is not None},
        preprocessing=preprocessing,
        metrics=headline,
    )
