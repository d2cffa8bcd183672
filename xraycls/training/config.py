"""From a composed Hydra config to the run's parts: objects, the hardware plan, its Trainer arguments, the
checkpoint to resume from, the threshold settings. Every reader of `cfg` for the build phase is here.

Every constructor validates its settings, so a wrong config stops while these run, before data or weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf

from xraycls.hardware.plan import HardwarePlan, plan_from_config, trainer_arguments
from xraycls.hardware.threads import available_cores, idle_cores
from xraycls.inference.thresholds import check_threshold_settings
from xraycls.training.summary import SUMMARY_NAME

__all__ = [
    "instantiate",
    "instantiate_group",
    "hardware_plan",
    "hardware_arguments",
    "ipu_settings",
    "find_resume_checkpoint",
    "threshold_settings",
]


def instantiate(node: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate` with plain containers, re-raising a constructor's own ValueError or
    FileNotFoundError, so a wrong setting reads as one line naming it, not a wrapped Hydra error."""
    try:
        return hydra_instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, ValueError | FileNotFoundError):
            raise error.__cause__ from None
        raise


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """The objects of a config group whose entries each hold a `_target_` (callbacks, logger)."""
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def hardware_plan(cfg: DictConfig, env: Mapping[str, str] | None = None) -> HardwarePlan:
    """The resolved plan of a composed run config (xraycls.hardware.plan); raises PlanError before any work
    on a bad combination. An IPU layout is checked against the model's depth (timm, on the meta device).
    `hardware.cpu_threads=auto` on the CPU reads the idle cores now (0.2 s, xraycls.hardware.threads)."""
    hardware = OmegaConf.to_container(cfg.hardware, resolve=True)
    idle = None
    if hardware.get("cpu_threads", "auto") == "auto" and hardware.get("accelerator") in ("cpu", "auto"):
        idle = idle_cores()
    model_depth = None
    if hardware.get("accelerator") == "ipu" and hardware.get("layers_per_ipu") is not None:
        from xraycls.model.backbone import backbone_depth

        model = OmegaConf.to_container(cfg.model, resolve=True)
        kwargs = {key: model[key] for key in ("img_size", "patch_size") if model.get(key) is not None}
        model_depth = backbone_depth(model.get("backbone", "vit_base_patch16_224"), **kwargs)
    config = {
        "hardware": hardware,
        "data": {"batch_size": cfg.data.batch_size, "num_workers": cfg.data.get("num_workers", 0)},
        "trainer": {"accumulate_grad_batches": cfg.trainer.get("accumulate_grad_batches", 1)},
    }
    return plan_from_config(
        config, env=env, model_depth=model_depth, cores=available_cores(), idle_cores=idle
    )


def ipu_settings(cfg: DictConfig) -> dict[str, Any]:
    """The `hardware.ipu` node as a plain dict (empty off the IPU)."""
    return OmegaConf.to_container(cfg.hardware, resolve=True).get("ipu") or {}


def hardware_arguments(cfg: DictConfig, plan: HardwarePlan) -> dict[str, Any]:
    """Trainer accelerator, strategy, devices, num_nodes, precision and accumulation from the plan."""
    if plan.accelerator != "ipu":
        return trainer_arguments(plan)
    from xraycls.hardware.ipu import IPUSettings, ipu_trainer_arguments  # PopTorch: the IPU stack only

    return ipu_trainer_arguments(
        plan,
        IPUSettings(**ipu_settings(cfg)),
        seed=int(cfg.seed),
        gradient_clip_val=cfg.trainer.get("gradient_clip_val"),
    )


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


def threshold_settings(cfg: DictConfig) -> dict[str, Any]:
    """The `thresholds` node checked: {"method", "target_sensitivity"} for `choose_thresholds`."""
    node = cfg.get("thresholds") or {}
    method = str(node.get("method", "youden"))
    return {
        "method": method,
        "target_sensitivity": check_threshold_settings(method, node.get("target_sensitivity")),
    }
