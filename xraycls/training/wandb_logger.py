"""Weights & Biases logging: online with a configured API key, offline otherwise, never printing the key.

- Sweeps: in a Hydra multirun every job joins one W&B group, the sweep (its directory relative to
  `paths.runs_dir`), and is named `<task_name>/<job dir>`; `job_type` is the experiment (`task_name`), and
  tags name the experiment and the hardware. Each job writes under its own run directory.
- Epoch-level metrics plot against `epoch`; the summary keeps the best validation AUROCs and loss
  (`define_metric`), not the last, and ends with summary.json's values (the best checkpoint's).
- Resume: the run id is stored in `<run dir>/wandb_run_id` when the logger is made, and a rerun of that
  directory passes it back with `resume="allow"`. Online the same W&B run continues; offline wandb writes a
  second `wandb/offline-run-<time>-<id>` folder with the same id, and `wandb sync` uploads both into it.
"""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from xraycls.files import write_text
from xraycls.findings import LABELS
from xraycls.training.wandb_media import auroc_table, epoch_auroc_table, model_artifact, roc_curves_plot

__all__ = [
    "RUN_ID_FILE",
    "WANDB_MODES",
    "XrayWandbLogger",
    "define_epoch_metrics",
    "make_wandb_logger",
    "stored_run_id",
    "sweep_group",
    "wandb_key_configured",
]

log = logging.getLogger(__name__)

WANDB_MODES = ("auto", "online", "offline")
RUN_ID_FILE = "wandb_run_id"
_WANDB_HOST = "api.wandb.ai"
_PER_FINDING = "val/auroc/"
# Logged once per epoch by XrayClassifier; each is drawn against `epoch`, summarised by its best value.
_EPOCH_METRICS: dict[str, str | None] = {
    "train/loss_epoch": None,
    "val/loss": "min",
    "val/auroc_macro14": "max",
    "val/auroc_macro15": "max",
    "val/auroc_seed_compat": "max",
    **{f"{_PER_FINDING}{label}": None for label in LABELS},
}


def wandb_key_configured() -> bool:
    """True when W&B would find an API key (WANDB_API_KEY or `wandb login`'s ~/.netrc entry).

    Only the presence is checked; the key itself is never read into a message or a log.
    """
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(_WANDB_HOST) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def sweep_group(runs_dir: str | Path | None = None) -> str | None:
    """The sweep this process runs a job of: `hydra.sweep.dir` relative to `runs_dir` (its basename when
    outside), or None outside a Hydra multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    sweep_dir = Path(HydraConfig.get().sweep.dir).resolve()
    if runs_dir is not None and sweep_dir.is_relative_to(Path(runs_dir).resolve()):
        return sweep_dir.relative_to(Path(runs_dir).resolve()).as_posix()
    return sweep_dir.name


def stored_run_id(save_dir: str | Path) -> str:
    """This run directory's W&B run id: a sweep agent's (WANDB_RUN_ID), else the one an earlier start stored
    in `<save_dir>/wandb_run_id`, else a new one. Rank 0 stores it, so a rerun finds it."""
    from wandb.sdk.lib.runid import generate_id

    path = Path(save_dir) / RUN_ID_FILE
    stored = path.read_text().strip() if path.is_file() else ""
    run_id = os.environ.get("WANDB_RUN_ID") or stored or generate_id()
    if rank_zero_only.rank == 0 and run_id != stored:
        write_text(path, run_id + "\n")
    return run_id


def define_epoch_metrics(run: Any) -> None:
    """Epoch-level keys against `epoch`; the summary keeps the best value (not the last) where one is set."""
    run.define_metric("epoch")
    for key, summary in _EPOCH_METRICS.items():
        run.define_metric(key, step_metric="epoch", summary=summary)


class XrayWandbLogger(WandbLogger):
    """Lightning's WandbLogger plus epoch-level axes and best-value summaries, a per-epoch per-finding AUROC
    table, and `log_run_summary` (per-finding tables, headline metrics, test ROC curves, the run's plots, the
    model bundle as an artifact when online)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._metrics_defined = False
        self._val_per_finding: dict[int, dict[str, float]] = {}  # epoch -> {label: AUROC}
        self._trained_epochs: set[int] = set()

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self._metrics_defined:
            define_epoch_metrics(self.experiment)
            self._metrics_defined = True
        super().log_metrics(metrics, step)
        if "epoch" not in metrics:
            return
        epoch = int(metrics["epoch"])
        if "train/loss_epoch" in metrics:
            self._trained_epochs.add(epoch)
        per_finding = {
            key[len(_PER_FINDING) :]: float(value)
            for key, value in metrics.items()
            if key.startswith(_PER_FINDING)
        }
        if per_finding:
            self._val_per_finding[epoch] = per_finding

    def summary_entries(self) -> dict[str, Any]:
        """What summary.json records of this logger: the W&B run id (the sweep record's `wandb_run_id`)."""
        return {"wandb_run_id": self.version}

    @rank_zero_only
    def log_run_summary(
        self, summary: dict, test_outputs: tuple[np.ndarray, np.ndarray] | None = None
    ) -> None:
        """summary.json's results, the per-epoch per-finding table of the epochs this process trained (a
        resumed run's earlier epochs are in its history, not in this table), `test_outputs`' ROC curves."""
        import wandb

        run = self.experiment
        for stage in ("val", "test"):
            block = (summary.get("metrics") or {}).get(stage)
            if not block:
                continue
            run.log({f"{stage}/auroc_per_finding": auroc_table(block.get("auroc_per_finding", {}))})
            for key in ("auroc_macro14", "auroc_macro15", "auroc_seed_compat", "loss"):
                if block.get(key) is not None:
                    run.summary[f"{stage}/{key}"] = block[key]
        # Epochs that trained: the best checkpoint's validation after fit is logged too, at no trained epoch.
        trained = {
            epoch: row for epoch, row in self._val_per_finding.items() if epoch in self._trained_epochs
        }
        if trained:
            run.log({"val/auroc_by_epoch": epoch_auroc_table(trained)})
        if test_outputs is not None:
            labels = summary.get("labels") or list(LABELS)
            plot = roc_curves_plot(*test_outputs, labels, title="Test ROC curves per finding")
            if plot is not None:
                run.log({"test/roc_curves": plot})
        images = {
            f"plots/{Path(path).stem}": wandb.Image(str(path))
            for path in summary.get("plots", [])
            if Path(path).is_file()
        }
        if images:
            run.log(images)
        accelerator = (summary.get("hardware") or {}).get("accelerator")
        if accelerator and f"accelerator:{accelerator}" not in run.tags:
            run.tags = (*run.tags, f"accelerator:{accelerator}")
        self._log_model_bundle(run, summary)

    def _log_model_bundle(self, run: Any, summary: dict) -> None:
        model_dir = summary.get("model_dir")
        if not model_dir or not Path(model_dir).is_dir():
            return
        if self._offline or getattr(run, "offline", False):
            # Artifacts need the server; Lightning refuses log_model offline for the same reason.
            log.info(
                "W&B offline: the model bundle stays in %s; after `wandb sync`, attach it to run %s with "
                "`wandb artifact put --id %s --type model --name %s/model-%s %s`",
                model_dir, run.id, run.id, self._project, run.id, model_dir,
            )  # fmt: skip
            return
        val = (summary.get("metrics") or {}).get("val") or {}
        metadata = {"task_name": summary.get("task_name"), "labels": summary.get("labels")}
        metadata["val/auroc_macro14"] = val.get("auroc_macro14")
        run.log_artifact(model_artifact(Path(model_dir), run.id, metadata), aliases=["best", "latest"])

    def close(self) -> None:
        """Finish the W&B run, so a sweep's next job starts its own run and offline files are complete."""
        if self._experiment is not None:
            self._experiment.finish()


def _finish_leftover_run() -> None:
    import wandb

    if wandb.run is not None:  # an earlier job of this process (a failed sweep trial) left its run open
        log.warning("W&B: finishing run %s left open by an earlier job of this process", wandb.run.id)
        wandb.run.finish(exit_code=1)


def make_wandb_logger(
    project: str = "xraycls",
    name: str | None = None,
    save_dir: str = ".",
    mode: str = "auto",
    tags: list[str] | None = None,
    group: str | None = None,
    job_type: str | None = None,
    context_tags: Mapping[str, Any] | None = None,
    runs_dir: str | None = None,
    **kwargs: Any,
) -> XrayWandbLogger:
    """A W&B logger writing under `save_dir/wandb/`. `mode="auto"`: online when a key is configured, else
    offline, with the `wandb sync` command to upload the run later.

    `group` None: the sweep in a Hydra multirun (`sweep_group(runs_dir)`), else none. `context_tags`
    {key: value} adds `key:value` tags before `tags`. The run id is `stored_run_id(save_dir)` unless `id`
    is given. A W&B run still open in this process (a failed earlier job of a sweep) is finished first.
    """
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.wandb.mode must be one of {list(WANDB_MODES)}, got {mode!r}")
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        mode = "offline"
    offline = mode == "offline" or (mode == "auto" and not wandb_key_configured())
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    sweep = sweep_group(runs_dir)
    if group is None:
        group = sweep
    if sweep is not None and name:
        name = f"{name}/{Path(save_dir).name}"
    labelled = [f"{key}:{value}" for key, value in (context_tags or {}).items() if value is not None]
    all_tags = list(dict.fromkeys([*labelled, *(tags or [])]))
    if kwargs.get("id") is None:
        kwargs["id"] = stored_run_id(save_dir)
    kwargs.setdefault("resume", "allow")
    if offline:
        log.info(
            "W&B: no API key configured (or offline requested): logging offline to %s/wandb; "
            "upload later with `wandb sync %s/wandb/offline-run-*`",
            save_dir,
            save_dir,
        )
    _finish_leftover_run()
    return XrayWandbLogger(
        project=project,
        name=name,
        save_dir=save_dir,
        offline=offline,
        tags=all_tags,
        group=group,
        job_type=job_type,
        **kwargs,
    )
