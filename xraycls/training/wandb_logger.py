"""Weights & Biases logging: online with a configured API key, offline otherwise, never printing the key."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

__all__ = ["XrayWandbLogger", "make_wandb_logger", "wandb_key_configured", "WANDB_MODES"]

log = logging.getLogger(__name__)

WANDB_MODES = ("auto", "online", "offline")
_WANDB_HOST = "api.wandb.ai"


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


class XrayWandbLogger(WandbLogger):
    """Lightning's WandbLogger plus `log_run_summary`: the per-finding AUROC table, headline metrics and the
    run's plots (loss/lr curves, validation AUROC, ROC curves, sample grid) as images."""

    def log_run_summary(self, summary: dict) -> None:
        import wandb

        for stage in ("val", "test"):
            block = (summary.get("metrics") or {}).get(stage)
            if not block:
                continue
            rows = [[name, value] for name, value in block.get("auroc_per_finding", {}).items()]
            table = wandb.Table(columns=["finding", "auroc"], data=rows)
            self.experiment.log({f"{stage}/auroc_per_finding": table})
            for key in ("auroc_macro14", "auroc_macro15", "auroc_seed_compat", "loss"):
                if block.get(key) is not None:
                    self.experiment.summary[f"{stage}/{key}"] = block[key]
        images = {
            f"plots/{Path(path).stem}": wandb.Image(str(path))
            for path in summary.get("plots", [])
            if Path(path).is_file()
        }
        if images:
            self.experiment.log(images)

    def close(self) -> None:
        """Finish the W&B run, so a sweep's next job starts its own run and offline files are complete."""
        if self._experiment is not None:
            self._experiment.finish()


def make_wandb_logger(
    project: str = "xraycls",
    name: str | None = None,
    save_dir: str = ".",
    mode: str = "auto",
    tags: list[str] | None = None,
    **kwargs: Any,
) -> XrayWandbLogger:
    """A W&B logger writing under `save_dir/wandb/`. `mode="auto"`: online when a key is configured, else
    offline, with the `wandb sync` command to upload the run later."""
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.wandb.mode must be one of {list(WANDB_MODES)}, got {mode!r}")
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        mode = "offline"
    offline = mode == "offline" or (mode == "auto" and not wandb_key_configured())
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if offline:
        log.info(
            "W&B: no API key configured (or offline requested): logging offline to %s/wandb; "
            "upload later with `wandb sync %s/wandb/offline-run-*`",
            save_dir,
            save_dir,
        )
    return XrayWandbLogger(
        project=project, name=name, save_dir=save_dir, offline=offline, tags=list(tags or []), **kwargs
    )
