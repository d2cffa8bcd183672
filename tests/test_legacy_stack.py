"""The legacy (IPU-era) stack: the pins of requirements/legacy.txt are what runs, Lightning 2.0.9's IPU parts
are there, and `ipu_trainer_arguments` builds them from a vPOD plan.

These tests run under `make test-legacy` (.venv-legacy). On the main stack the module is skipped with that
reason: Lightning 2.6 has no IPU classes to build (test_ipu.py checks its one-line refusal there instead).
PopTorch is absent on both stacks (Poplar SDK only): where it is needed, test_ipu.py's recording stand-in
plays it, so these tests show that our code drives Lightning's real IPU classes, not that an IPU runs them.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

import lightning
import pytest
from _project import PROJECT_ROOT, compose_cfg
from omegaconf import OmegaConf
from test_ipu import FakePoptorch

from xraycls.hardware.ipu import (
    IPUSettings,
    IPUUnavailableError,
    _lightning_ipu_classes,
    ipu_trainer_arguments,
)
from xraycls.hardware.plan import plan_from_config

pytestmark = pytest.mark.skipif(
    not lightning.__version__.startswith("2.0."),
    reason=f"legacy IPU stack only (Lightning 2.0.x, not {lightning.__version__}): run by make test-legacy",
)

REQUIREMENTS = PROJECT_ROOT / "requirements" / "legacy.txt"


def _vpod_plan(pod: str, tmp_path):
    """The plan `python train.py hardware=vpodN` resolves, from the real Hydra config."""
    cfg = compose_cfg([f"hardware={pod}"], tmp_path)
    config = OmegaConf.to_container(cfg, resolve=True)
    return plan_from_config(config), IPUSettings(**(config["hardware"].get("ipu") or {}))


def test_the_installed_versions_are_the_pins_of_requirements_legacy() -> None:
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", REQUIREMENTS.read_text(), flags=re.MULTILINE))
    assert {"torch", "lightning", "lightning-graphcore", "numpy"} <= set(pins)
    installed = {name: metadata.version(name) for name in pins}
    assert installed == pins
    assert int(pins["numpy"].split(".")[0]) < 2


def test_lightnings_ipu_classes_come_from_core_and_else_from_lightning_graphcore(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import lightning.pytorch.strategies as strategies
    import lightning_graphcore
    from lightning.pytorch.accelerators import IPUAccelerator
    from lightning.pytorch.plugins.precision import IPUPrecisionPlugin

    core = _lightning_ipu_classes("vpod4")
    assert core == ("core", IPUAccelerator, strategies.IPUStrategy, IPUPrecisionPlugin)
    monkeypatch.delattr(strategies, "IPUStrategy")  # as in a core without it: the package takes over
    graphcore = _lightning_ipu_classes("vpod4")
    expected = (
        lightning_graphcore.IPUAccelerator,
        lightning_graphcore.IPUStrategy,
        lightning_graphcore.IPUPrecision,
    )
    assert graphcore == ("graphcore", *expected)


def test_without_poptorch_only_poptorch_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    plan, settings = _vpod_plan("vpod4", tmp_path)
    monkeypatch.setitem(sys.modules, "poptorch", None)  # import poptorch -> ImportError, as here
    with pytest.raises(IPUUnavailableError, match=r"hardware=vpod4 needs PopTorch") as caught:
        ipu_trainer_arguments(plan, settings, seed=1)
    message = str(caught.value)
    assert "import poptorch failed" in message and "which has no IPU strategy" not in message


def test_ipu_trainer_arguments_build_lightnings_ipu_strategy_from_the_plan(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    import lightning.pytorch.strategies.ipu as core_ipu
    from lightning.pytorch.accelerators import IPUAccelerator
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    plan, settings = _vpod_plan("vpod16", tmp_path)
    monkeypatch.setitem(sys.modules, "poptorch", FakePoptorch())
    # Our code gets through to Lightning's own IPU strategy, which then looks for IPU hardware: none here.
    with pytest.raises(MisconfigurationException, match="requires IPU devices"):
        ipu_trainer_arguments(plan, settings, seed=1)

    monkeypatch.setattr(core_ipu, "_IPU_AVAILABLE", True)  # what an IPU host's poptorch reports
    arguments = ipu_trainer_arguments(plan, settings, seed=1)
    strategy = arguments["strategy"]
    assert isinstance(strategy, core_ipu.IPUStrategy) and isinstance(arguments["accelerator"], IPUAccelerator)
    assert (arguments["devices"], arguments["num_nodes"], arguments["precision"]) == (4, 1, "16-mixed")
    assert arguments["accumulate_grad_batches"] == 1  # the device accumulates: one host batch, one step
    assert strategy.device_iterations == plan.device_iterations
    # Lightning keeps the options it was given (it builds its own only when none are passed).
    training, inference = strategy._training_opts, strategy._inference_opts
    assert training.called("replicationFactor") == inference.called("replicationFactor") == [(4,)]
    assert training.called("Training.gradientAccumulation") == [(plan.accumulation,)]
    assert inference.called("deviceIterations") == [(plan.inference_device_iterations,)]
    assert training.called("randomSeed") == [(1,)]
