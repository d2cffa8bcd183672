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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from omegaconf import DictConfig, OmegaConf

from xraycls.files import write_json
from xraycls.findings import LABELS
from xraycls.hardware.plan import HardwarePlan, plan_from_config, trainer_arguments
from xraycls.inference.bundle import export_bundle
from xraycls.inference.thresholds import check_threshold_settings, choose_thresholds
from xraycls.model.module import XrayClassifier, pos_weight_from_prevalence
from xraycls.report.plots import plot_roc_curves, plot_sample_grid, plot_training_curves
from xraycls.report.preparation import preparation_timing
from xraycls.report.summary import collect_versions
from xraycls.report.timing import RunTimer

__all__ = ["run_training", "hardware_plan", "instantiate_callbacks", "find_resume_checkpoint", "SUMMARY_NAME"]

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"
_HEADLINE_KEYS = ("split", "loss", "auroc_macro14", "auroc_macro15", "auroc_seed_compat")


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


def instantiate_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The `callbacks` group's objects; `trainer.enable_progress_bar=false` drops its progress bar
    (a plain Trainer refuses a bar callback with that setting: the flag wins, as users expect)."""
    callbacks = _instantiate_group(cfg.get("callbacks"))
    if cfg.trainer.get("enable_progress_bar", True):
        return callbacks
    return [callback for callback in callbacks if not isinstance(callback, ProgressBar)]


def hardware_plan(cfg: DictConfig, env: Mapping[str, str] | None = None) -> HardwarePlan:
    """The resolved plan of a composed run config (xraycls.hardware.plan); raises PlanError before any work
    on a bad combination. An IPU layout is checked against the model's depth (timm, on the meta device)."""
    hardware = OmegaConf.to_container(cfg.hardware, resolve=True)
    model_depth = None
    if hardware.get("accelerator") == "ipu" and hardware.get("layers_per_ipu") is not None:
        from xraycls.model.backbone import backbone_depth

        model = OmegaConf.to_container(cfg.model, resolve=True)
        kwargs = {key: model[key] for key in ("img_size", "patch_size") if model.get(key) is not None}
        model_depth = backbone_depth(model.get("backbone", "vit_base_patch16_224"), **kwargs)
    config = {
        "hardware": hardware,
        "data": {"batch_size": cfg.data.batch_size},
        "trainer": {"accumulate_grad_batches": cfg.trainer.get("accumulate_grad_batches", 1)},
    }
    return plan_from_config(config, env=env, model_depth=model_depth)


def _hardware_arguments(cfg: DictConfig, plan: HardwarePlan) -> dict[str, Any]:
    """Trainer accelerator, strategy, devices, num_nodes, precision and accumulation from the plan."""
    if plan.accelerator != "ipu":
        return trainer_arguments(plan)
    from xraycls.hardware.ipu import IPUSettings, ipu_trainer_arguments  # PopTorch: the IPU stack only

    return ipu_trainer_arguments(
        plan,
        IPUSettings(**(OmegaConf.to_container(cfg.hardware, resolve=True).get("ipu") or {})),
        seed=int(cfg.seed),
        gradient_clip_val=cfg.trainer.get("gradient_clip_val"),
    )


def _build_model(cfg: DictConfig, datamodule: Any) -> XrayClassifier:
    overrides: dict[str, Any] = {}
    if cfg.get("pos_weight_from_data"):
        overrides["pos_weight"] = pos_weight_from_prevalence(datamodule.train_label_prevalence())
    return instantiate(cfg.model, **overrides)


def _write_plots(
    run_dir: Path, test_outputs: tuple[np.ndarray, np.ndarray] | None, datamodule: Any
) -> list[str]:
    plots_dir = run_dir / "plots"
    written = [str(path) for path in plot_training_curves(run_dir / "metrics.csv", plots_dir)]
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


def _threshold_settings(cfg: DictConfig) -> dict[str, Any]:
    node = cfg.get("thresholds") or {}
    method = str(node.get("method", "youden"))
    return {
        "method": method,
        "target_sensitivity": check_threshold_settings(method, node.get("target_sensitivity")),
    }


def _gathered_outputs(
    trainer: L.Trainer, model: XrayClassifier, stage: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """Every rank's probabilities and labels of the last `stage` ("val", "test") pass, float32 [N, 15] each.

    A collective with several processes: call it on every rank. Each image is seen once (the DataModule's
    eval loaders are unpadded under DDP), so the gathered rows are the whole split.
    """
    local = model.eval_outputs(stage)
    if trainer.world_size == 1:
        return local
    width = len(LABELS)
    rows = np.zeros((0, 2 * width), np.float32) if local is None else np.concatenate(local, axis=1)
    # all_gather needs one shape on every rank: pad to the largest count, then cut each rank's part back.
    counts = trainer.strategy.all_gather(torch.tensor([len(rows)], device=model.device)).reshape(-1)
    padded = torch.zeros((int(counts.max()), 2 * width), device=model.device)
    padded[: len(rows)] = torch.from_numpy(rows).to(model.device)
    gathered = trainer.strategy.all_gather(padded)
    everything = torch.cat([part[: int(n)] for part, n in zip(gathered, counts, strict=True)]).cpu().numpy()
    if not len(everything):
        return None
    return everything[:, :width], everything[:, width:]


def _choose_thresholds(
    outputs: tuple[np.ndarray, np.ndarray] | None, settings: dict, split: str
) -> dict | None:
    """Operating thresholds from the best checkpoint's validation pass (never the test set)."""
    if outputs is None:
        log.warning("no validation outputs: no operating thresholds are stored with the model")
        return None
    probs, labels = outputs
    return {**choose_thresholds(probs, labels, **settings), "chosen_on": {"stage": "val", "split": split}}


def run_training(cfg: DictConfig) -> dict:
    """Fit, validate and test the best checkpoint, export and plot; returns the summary written to disk."""
    started, started_at = time.perf_counter(), time.time()
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)

    # Every constructor validates its settings, so a wrong config stops here, before data or weights.
    threshold_settings = _threshold_settings(cfg)
    plan = hardware_plan(cfg)
    hardware_args = _hardware_arguments(cfg, plan)
    datamodule = instantiate(cfg.data, batch_size=plan.loader_batch)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    for key in hardware_args:  # passed as objects below, not merged into the config
        trainer_cfg.pop(key, None)
    callbacks = instantiate_callbacks(cfg)
    loggers = _instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        trainer_cfg, callbacks=callbacks, logger=loggers or False, **hardware_args
    )
    resume = find_resume_checkpoint(
        cfg.get("ckpt_path"), run_dir, Path(cfg.paths.runs_dir), str(cfg.task_name)
    )

    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = _build_model(cfg, datamodule)
    if plan.accelerator == "ipu":
        from xraycls.hardware.ipu import annotate_pipeline

        ipu_cfg = OmegaConf.to_container(cfg.hardware, resolve=True).get("ipu") or {}
        annotate_pipeline(model.backbone, plan.layers_per_ipu, recompute=ipu_cfg.get("recompute", True))
    if resume is not None:
        log.info("resuming from %s", resume)
    trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume) if resume else None)

    checkpoint = next((cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)), None)
    best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    # Validate the best checkpoint again so summary's val metrics belong to the exported weights.
    trainer.validate(model, datamodule=datamodule, ckpt_path=best, verbose=False)
    val_metrics = model.last_metrics.get("val")
    val_outputs = _gathered_outputs(trainer, model, "val")  # on every rank
    test_metrics = test_outputs = None
    if cfg.get("test"):
        trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)
        test_metrics = model.last_metrics.get("test")
        test_outputs = _gathered_outputs(trainer, model, "test")

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
        "hardware": plan.to_dict(),
        "data": data_summary,
        "labels": list(LABELS),
        "versions": collect_versions(),
        "shuffled_train_labels": bool(cfg.get("shuffle_train_labels")),
    }
    summary["thresholds"] = _choose_thresholds(val_outputs, threshold_settings, split_name)
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
            summary["plots"] = _write_plots(run_dir, test_outputs, datamodule)
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
        extra={"thresholds": summary.get("thresholds")},
    )
