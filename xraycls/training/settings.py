"""A run's settings, checked before any work: one line naming the setting, and nothing left on disk.

`check_settings` covers what no constructor sees before data is read: keys the project's own config nodes
do not know (a typo'd `+optim.foo=1` must not train silently), a trainer that could never take a step,
the model's settings and weight source, and the data's sources. `run.build` turns every configuration or
input error of its phase into a `SettingsError`; `train.py` prints it as one line, exits 2 and removes the
run folder Hydra made for it (`remove_unstarted_run_dir`). A finished run is never redone by accident
(`finished_summary`); `overwrite=true` moves its files aside first (`set_aside`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from xraycls.errors import SettingsError, one_line
from xraycls.hardware.ipu import IPUUnavailableError
from xraycls.model.backbone import WeightsUnavailableError, check_backbone_source
from xraycls.model.module import XrayClassifier, check_optim_settings
from xraycls.training.summary import SUMMARY_NAME

__all__ = [
    "SettingsError",
    "check_settings",
    "check_model_source",
    "setting_errors",
    "finished_summary",
    "set_aside",
    "remove_unstarted_run_dir",
]

log = logging.getLogger(__name__)

# The project's config folder, beside the package (absent from an installed wheel: then keys go unchecked).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# What a Hydra-made run folder holds before the run starts: nothing of the run's own.
_HYDRA_FILES = {".hydra", "train.log"}
_HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
# Errors that mean "this setting or input cannot work" when raised before any work (a bug raises others).
_SETTING_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IPUUnavailableError,
    WeightsUnavailableError,
    OmegaConfBaseException,
)


@contextmanager
def setting_errors() -> Iterator[None]:
    """Turn the configuration and input errors raised inside the block into a one-line `SettingsError`."""
    try:
        yield
    except SettingsError:
        raise
    except _SETTING_ERRORS as error:
        raise SettingsError(one_line(error)) from error


def check_settings(cfg: DictConfig, conf_dir: Path = CONF_DIR) -> None:
    """Raise `SettingsError` naming the first setting of `cfg` that cannot give a real run; reads no data."""
    with setting_errors():
        _check_known_keys(cfg, conf_dir)
        _check_trains_a_step(cfg.trainer)
        _check_model(OmegaConf.to_container(cfg.model, resolve=True))


def _yaml_mapping(path: Path) -> dict[str, Any]:
    content = yaml.safe_load(path.read_text()) or {}
    return {key: value for key, value in content.items() if key != "defaults"}


def _unknown(node_name: str, node: DictConfig, known: set[str]) -> None:
    extra = sorted(set(node) - known)
    if extra:
        takes = ", ".join(sorted(known - _HYDRA_KEYS))
        raise SettingsError(f"unknown setting {node_name}.{extra[0]}: {node_name} takes {takes}")


def _constructor_keys(target: str) -> set[str] | None:
    """The keyword arguments `target` accepts, or None when it takes any (**kwargs) or cannot be found."""
    try:
        parameters = inspect.signature(get_object(target)).parameters.values()
    except (ImportError, ValueError, TypeError, AttributeError):
        return None
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return None
    return {parameter.name for parameter in parameters} | _HYDRA_KEYS


def _check_known_keys(cfg: DictConfig, conf_dir: Path) -> None:
    """Every node the project owns rejects keys it does not know: the top level and the plain nodes by the
    keys their YAML files define, `_target_` nodes by their constructor's signature."""
    if not (conf_dir / "config.yaml").is_file():
        return
    base = _yaml_mapping(conf_dir / "config.yaml")
    groups = {path.name for path in conf_dir.iterdir() if path.is_dir()}
    top = set(base) | groups | {"hydra"}
    extra = sorted(set(cfg) - top)
    if extra:
        raise SettingsError(f"unknown setting {extra[0]}: the top level takes {', '.join(sorted(top))}")
    plain = {name: set(value) for name, value in base.items() if isinstance(value, dict)}
    for group in ("optim", "paths"):
        plain[group] = set().union(*(set(_yaml_mapping(path)) for path in (conf_dir / group).glob("*.yaml")))
    for name, known in plain.items():
        if isinstance(cfg.get(name), DictConfig):
            _unknown(name, cfg[name], known)
    for name in ("data", "model", "trainer"):
        node = cfg.get(name)
        known = (
            _constructor_keys(node["_target_"])
            if isinstance(node, DictConfig) and "_target_" in node
            else None
        )
        if known is not None:
            _unknown(name, node, known)


def _check_trains_a_step(trainer: DictConfig) -> None:
    """A run that can never take an optimizer step would ship its untrained weights as a model."""
    for key in ("max_epochs", "max_steps", "limit_train_batches"):
        value = trainer.get(key)
        if value is not None and not isinstance(value, bool) and value == 0:
            raise SettingsError(
                f"trainer.{key}={value}: this run would train no step and ship untrained weights as its "
                f"model; use a positive value"
            )


def _check_model(model: dict[str, Any]) -> None:
    """The module's optimiser settings, before data or weights (the weight source: `check_model_source`);
    settings the config leaves out take the module's own defaults."""
    parameters = inspect.signature(XrayClassifier).parameters
    value = {name: model.get(name, parameter.default) for name, parameter in parameters.items()}
    check_optim_settings(
        float(value["lr"]),
        float(value["weight_decay"]),
        float(value["warmup_ratio"]),
        float(value["min_lr_ratio"]),
        value["layer_decay"],
        tuple(value["betas"]),
    )


def check_model_source(cfg: DictConfig) -> None:
    """The backbone's timm name and weight source (a file that exists, or hub weights this machine can get),
    without building the model; after the hardware checks, since the hub check may ask the network."""
    model = OmegaConf.to_container(cfg.model, resolve=True)
    if "backbone" in model:
        check_backbone_source(str(model["backbone"]), model.get("weights", "hub"))


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a finished run in `run_dir` (its summary.json exists), or None."""
    path = Path(run_dir) / SUMMARY_NAME
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SettingsError(f"{path}: a finished run's summary that cannot be read ({error})") from None
    if not isinstance(summary, dict):
        raise SettingsError(f"{path}: a finished run's summary that is not a JSON object")
    return summary


def set_aside(run_dir: Path) -> Path | None:
    """Move a finished run's files (all but Hydra's own) into `run_dir/replaced_<time>/`; never deletes."""
    run_dir = Path(run_dir)
    entries = [
        path
        for path in run_dir.iterdir()
        if path.name not in _HYDRA_FILES and not path.name.startswith("replaced_")
    ]
    if not entries:
        return None
    target = run_dir / f"replaced_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    target.mkdir()
    for path in entries:
        shutil.move(str(path), str(target / path.name))
    log.info("overwrite=true: the previous run's files are kept in %s", target)
    return target


def remove_unstarted_run_dir(run_dir: Path) -> bool:
    """Remove a run folder that holds nothing but what Hydra wrote for a run refused before any work (and
    its task folder, if that is left empty); a folder holding anything else is kept."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not {path.name for path in run_dir.iterdir()} <= _HYDRA_FILES:
        return False
    shutil.rmtree(run_dir)
    with contextlib.suppress(OSError):
        run_dir.parent.rmdir()  # only succeeds when empty
    return True
