"""The IPU path against a recording stand-in of PopTorch.

Why a stand-in: PopTorch ships only inside Graphcore's Poplar SDK (no package registry has it) and needs
IPU hardware to run, so neither exists here. `FakePoptorch` implements the documented surface this code
calls (`Options` with `replicationFactor`, `deviceIterations`, `Training.gradientAccumulation`,
`Training.accumulationAndReplicationReductionType`, `TensorLocations.setOptimizerLocation`,
`setExecutionStrategy`, `setAvailableMemoryProportion`, `Precision.setPartialsType`,
`enableExecutableCaching`, `outputMode`, `randomSeed`; `BeginBlock`, `recomputationCheckpoint`,
`PipelinedExecution`, `AutoStage`, `ReductionType`, `OutputMode`, `TensorLocationSettings`) and records
every call. These tests check WHAT we ask PopTorch for; they do not show that an IPU runs it. IPU execution
is not verified in this project.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from _project import PROJECT_ROOT
from hydra import compose, initialize_config_dir
from torch import nn

from xraycls.errors import SettingsError
from xraycls.hardware.ipu import (
    IPUSettings,
    IPUUnavailableError,
    annotate_pipeline,
    block_stages,
    build_options,
    ipu_trainer_arguments,
    require_poptorch,
)
from xraycls.hardware.plan import PlanError, resolve_plan
from xraycls.model.backbone import backbone_depth
from xraycls.training import run_training


class _Recorder:
    def __init__(self, calls: list, prefix: str) -> None:
        self._calls, self._prefix = calls, prefix

    def __getattr__(self, name: str):
        if name not in self._allowed:
            raise AttributeError(f"poptorch stand-in: {self._prefix}{name} is not part of the documented API")

        def record(*args, **kwargs):
            self._calls.append((self._prefix + name, args, kwargs))
            return self

        return record


class _Options(_Recorder):
    _allowed = {
        "replicationFactor",
        "deviceIterations",
        "setExecutionStrategy",
        "setAvailableMemoryProportion",
        "enableExecutableCaching",
        "outputMode",
        "randomSeed",
    }

    def __init__(self) -> None:
        self.calls: list = []
        super().__init__(self.calls, "")
        self.Training = _Sub(
            self.calls, "Training.", {"gradientAccumulation", "accumulationAndReplicationReductionType"}
        )
        self.Precision = _Sub(self.calls, "Precision.", {"setPartialsType"})
        self.TensorLocations = _Sub(self.calls, "TensorLocations.", {"setOptimizerLocation"})

    def called(self, name: str) -> list[tuple]:
        return [args for call, args, _ in self.calls if call == name]


class _Sub(_Recorder):
    def __init__(self, calls: list, prefix: str, allowed: set[str]) -> None:
        super().__init__(calls, prefix)
        self._allowed = allowed


class _TensorLocationSettings:
    def __init__(self) -> None:
        self.on_chip: bool | None = None
        self.sharded: bool | None = None

    def useOnChipStorage(self, value: bool) -> _TensorLocationSettings:  # noqa: N802 (PopTorch's name)
        self.on_chip = value
        return self

    def useReplicatedTensorSharding(self, value: bool) -> _TensorLocationSettings:  # noqa: N802
        self.sharded = value
        return self


class FakePoptorch(SimpleNamespace):
    """A recording stand-in for the `poptorch` module (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__(
            Options=_Options,
            TensorLocationSettings=_TensorLocationSettings,
            PipelinedExecution=lambda auto_stage: ("PipelinedExecution", auto_stage),
            AutoStage=SimpleNamespace(SameAsIpu="SameAsIpu"),
            ReductionType=SimpleNamespace(Mean="Mean", Sum="Sum"),
            OutputMode=SimpleNamespace(All="All", Final="Final"),
            checkpoints=[],
        )

    def BeginBlock(self, layer: nn.Module, user_id: str | None = None, ipu_id: int | None = None):  # noqa: N802
        layer.ipu_stage = (user_id, ipu_id)
        return layer

    def recomputationCheckpoint(self, tensor: torch.Tensor) -> torch.Tensor:  # noqa: N802
        self.checkpoints.append(tuple(tensor.shape))
        return tensor


def _plan(pod_ipus: int, precision: str = "16-mixed", **kwargs):
    return resolve_plan(
        f"vpod{pod_ipus}",
        accelerator="ipu",
        precision=precision,
        micro_batch=1,
        accumulation=128,
        inference_device_iterations=4,
        pod_ipus=pod_ipus,
        ipus_per_replica=4,
        layers_per_ipu=[3, 3, 3, 3],
        model_depth=12,
        env={},
        cuda_devices=0,
        **kwargs,
    )


def test_training_options_follow_the_plan_and_graphcores_vit_recipe() -> None:
    settings = IPUSettings(executable_cache_dir="/tmp/exe_cache")
    opts = build_options(_plan(16), settings, training=True, seed=1337, poptorch=FakePoptorch())
    assert opts.called("replicationFactor") == [(4,)]  # 16 IPUs / 4 per replica
    assert opts.called("deviceIterations") == [(1,)]
    assert opts.called("Training.gradientAccumulation") == [(128,)]
    assert opts.called("Training.accumulationAndReplicationReductionType") == [("Mean",)]
    assert opts.called("setExecutionStrategy") == [(("PipelinedExecution", "SameAsIpu"),)]
    assert opts.called("setAvailableMemoryProportion") == [({f"IPU{i}": 0.3 for i in range(4)},)]
    assert opts.called("Precision.setPartialsType") == [(torch.half,)]
    (location,) = opts.called("TensorLocations.setOptimizerLocation")[0]
    assert (location.on_chip, location.sharded) == (False, True)
    assert opts.called("enableExecutableCaching") == [("/tmp/exe_cache",)]
    assert opts.called("outputMode") == [("All",)] and opts.called("randomSeed") == [(1337,)]


def test_inference_options_have_no_accumulation_and_more_device_iterations() -> None:
    opts = build_options(_plan(4), training=False, poptorch=FakePoptorch())
    assert opts.called("deviceIterations") == [(4,)] and opts.called("replicationFactor") == [(1,)]
    assert not opts.called("Training.gradientAccumulation")
    assert not opts.called("TensorLocations.setOptimizerLocation") and not opts.called("randomSeed")


def test_one_replica_does_not_shard_and_fp32_keeps_fp32_partials() -> None:
    opts = build_options(_plan(4, precision="32-true"), training=True, poptorch=FakePoptorch())
    (location,) = opts.called("TensorLocations.setOptimizerLocation")[0]
    assert location.sharded is False  # replicated tensor sharding needs two or more replicas
    assert not opts.called("Precision.setPartialsType")
    with pytest.raises(PlanError, match="needs an IPU plan"):
        build_options(resolve_plan("cpu", env={}, cuda_devices=0), training=True, poptorch=FakePoptorch())


def test_block_stages() -> None:
    assert block_stages([3, 3, 3, 3]) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert block_stages([2, 0, 1]) == [0, 0, 2]


def test_every_vit_b_block_sits_on_exactly_one_ipu_in_order() -> None:
    with torch.device("meta"):  # the real ViT-B/16 layout, no weights in memory
        vit = timm.create_model("vit_base_patch16_224", pretrained=False)
    stages = annotate_pipeline(vit, [3, 3, 3, 3], poptorch=FakePoptorch())
    recorded = [block.ipu_stage[1] for block in vit.blocks]
    assert recorded == stages == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [block.ipu_stage[0] for block in vit.blocks] == [f"block{i}" for i in range(12)]
    assert vit.patch_embed.ipu_stage == ("embeddings", 0)
    assert vit.norm.ipu_stage[1] == 3 and vit.head.ipu_stage[1] == 3
    assert backbone_depth("vit_base_patch16_224") == 12


def test_annotation_keeps_the_forward_and_checkpoints_all_blocks_but_the_last() -> None:
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False, img_size=32, patch_size=8, num_classes=15).eval()
    images = torch.randn(2, 3, 32, 32)
    before = vit(images)
    fake = FakePoptorch()
    annotate_pipeline(vit, [2, 2, 1, 1], poptorch=fake)
    assert torch.equal(vit(images), before)
    assert len(fake.checkpoints) == len(vit.blocks) - 1 == 5
    with pytest.raises(PlanError, match=r"places 4 blocks; the model has 6"):
        annotate_pipeline(vit, [1, 1, 1, 1], poptorch=fake)
    with pytest.raises(ValueError, match="needs a timm ViT"):
        annotate_pipeline(nn.Linear(2, 2), [1], poptorch=fake)


def test_without_poptorch_an_ipu_config_fails_at_once_naming_what_is_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "poptorch", None)  # import poptorch -> ImportError, even on an IPU host
    with pytest.raises(IPUUnavailableError, match="Poplar SDK") as caught:
        require_poptorch("vpod4")
    assert "Lightning 2.0" in str(caught.value) and "\n" not in str(caught.value)
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "experiment=demo",
                "hardware=vpod4",
                "hardware.layers_per_ipu=[2,2,1,1]",  # the demo's 6-block ViT
                f"paths.data_dir={tmp_path}/data",
                f"paths.output_dir={tmp_path}/run",
            ],
        )
    # run_training reports it as a setting error (one line, exit 2 from train.py), caused by the same error.
    with pytest.raises(SettingsError, match="hardware=vpod4 needs PopTorch") as refused:
        run_training(cfg)
    assert isinstance(refused.value.__cause__, IPUUnavailableError)
    assert not (tmp_path / "data").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_lightning_without_ipu_support_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning

    from xraycls.hardware.ipu import _lightning_ipu_classes

    monkeypatch.setitem(sys.modules, "poptorch", FakePoptorch())
    if lightning.__version__.startswith("2.0."):  # the legacy IPU stack: its classes are found
        flavour, accelerator, strategy, _precision = _lightning_ipu_classes("vpod4")
        assert flavour in ("core", "graphcore") and strategy.__name__ == "IPUStrategy"
        return
    with pytest.raises(IPUUnavailableError, match=rf"lightning {lightning.__version__}, which has no IPU"):
        ipu_trainer_arguments(_plan(4))


def test_gradient_clipping_is_refused_before_anything_else() -> None:
    with pytest.raises(PlanError, match="gradient_clip_val=1.0: Lightning's IPU strategy cannot clip"):
        ipu_trainer_arguments(_plan(4), gradient_clip_val=1.0)
