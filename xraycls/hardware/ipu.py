"""The IPU path: PopTorch options from a `HardwarePlan`, pipeline stages on the ViT, Lightning's IPU parts.

Graphcore's `vit-base-ipu` recipe, expressed through the plan: a replica spans `ipus_per_replica` IPUs
(4), the 12 transformer blocks split `layers_per_ipu` ([3, 3, 3, 3]), embeddings on the first IPU, the
final norm, head and loss on the last; pipelined execution, a memory proportion for matmuls (0.3), half
partials, a recomputation checkpoint after every block, optimizer state off-chip and, across replicas,
replicated tensor sharding. Replication (`replicationFactor`) is the plan's `replicas`: 1 on a vPOD4, 4 on a
vPOD16, 16 on a vPOD64.

The IPU path needs PopTorch, which ships only as a wheel inside Graphcore's Poplar SDK (poptorch 3.3 for
torch 2.0.1), and Lightning 2.0.x (its core `IPUStrategy`, or the `lightning-graphcore` 0.1.0 package).
Nothing here imports either at module import: `require_poptorch` and `ipu_trainer_arguments` fail at once
with `IPUUnavailableError` naming what is missing. Functions that talk to PopTorch take a `poptorch`
argument (default: the real module), which lets tests drive them with a recording stand-in.
NOTE: this file must also run on the legacy stack (torch 2.0.1, Lightning 2.0.x).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from xraycls.hardware.plan import HardwarePlan, PlanError

__all__ = [
    "IPUSettings",
    "IPUUnavailableError",
    "IPU_REQUIREMENTS",
    "require_poptorch",
    "block_stages",
    "build_options",
    "annotate_pipeline",
    "ipu_trainer_arguments",
]

log = logging.getLogger(__name__)

IPU_REQUIREMENTS = (
    "PopTorch (the poptorch wheel inside Graphcore's Poplar SDK 3.3, built for torch 2.0.1; it is on no "
    "package registry) and Lightning 2.0.x (lightning==2.0.9, or lightning-graphcore==0.1.0); "
    "see README, 'IPU environment'"
)


class IPUUnavailableError(RuntimeError):
    """An IPU config was chosen where PopTorch or Lightning's IPU support is missing."""


@dataclass(frozen=True)
class IPUSettings:
    """IPU-only knobs beyond the plan (Graphcore's vit-base-ipu values by default)."""

    matmul_proportion: float = 0.3  # share of each IPU's memory for matmul/conv temporaries
    half_partials: bool = True  # fp16 partial sums in matmuls (fp16 runs only)
    recompute: bool = True  # recomputation checkpoint after each block but the last: activations vs time
    optimizer_state_offchip: bool = True  # AdamW moments in streaming memory, not on-chip SRAM
    replicated_tensor_sharding: bool = True  # shard the optimizer state across replicas (replicas > 1)
    executable_cache_dir: str | None = None  # compiled graphs reused across runs (minutes saved)

    def __post_init__(self) -> None:
        if not 0 < self.matmul_proportion <= 1:
            raise PlanError(
                f"hardware.ipu.matmul_proportion must be in (0, 1], got {self.matmul_proportion!r}"
            )


def require_poptorch(config_name: str = "an IPU config") -> ModuleType:
    """Import PopTorch, or raise IPUUnavailableError naming what the IPU path needs."""
    try:
        return importlib.import_module("poptorch")
    except ImportError as error:
        raise IPUUnavailableError(
            f"hardware={config_name} needs {IPU_REQUIREMENTS} (import poptorch failed: {error})"
        ) from None


def block_stages(layers_per_ipu: Sequence[int]) -> list[int]:
    """The IPU of each transformer block, in order: [3, 3, 3, 3] -> [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]."""
    return [ipu for ipu, count in enumerate(layers_per_ipu) for _ in range(int(count))]


def build_options(
    plan: HardwarePlan,
    settings: IPUSettings | None = None,
    *,
    training: bool,
    seed: int | None = None,
    poptorch: ModuleType | None = None,
) -> Any:
    """`poptorch.Options` for training (accumulation, mean reduction, optimizer placement) or inference.

    Both: replication = plan.replicas, pipelined execution with stages as annotated (`SameAsIpu`), the
    matmul memory proportion on every IPU of a replica, every output returned to the host (the host-side
    metric hooks need each image's logits), optional executable cache and seed.
    """
    if plan.accelerator != "ipu" or plan.ipus_per_replica is None:
        raise PlanError(f"build_options needs an IPU plan, got accelerator={plan.accelerator!r}")
    pt = poptorch if poptorch is not None else require_poptorch(plan.name)
    settings = settings or IPUSettings()
    opts = pt.Options()
    opts.replicationFactor(plan.replicas)
    if training:
        opts.deviceIterations(plan.device_iterations)
        opts.Training.gradientAccumulation(plan.accumulation)
        # Mean, not Sum: the loss scale (and so the lr) stays the same whatever the accumulation/replicas.
        opts.Training.accumulationAndReplicationReductionType(pt.ReductionType.Mean)
        sharding = settings.replicated_tensor_sharding and plan.replicas > 1
        if settings.optimizer_state_offchip or sharding:
            location = pt.TensorLocationSettings()
            location = location.useOnChipStorage(not settings.optimizer_state_offchip)
            location = location.useReplicatedTensorSharding(sharding)
            opts.TensorLocations.setOptimizerLocation(location)
    else:
        opts.deviceIterations(plan.inference_device_iterations)
    opts.setExecutionStrategy(pt.PipelinedExecution(pt.AutoStage.SameAsIpu))
    opts.setAvailableMemoryProportion(
        {f"IPU{ipu}": settings.matmul_proportion for ipu in range(plan.ipus_per_replica)}
    )
    if settings.half_partials and plan.precision != "32-true":
        opts.Precision.setPartialsType(torch.half)
    if settings.executable_cache_dir:
        opts.enableExecutableCaching(settings.executable_cache_dir)
    opts.outputMode(pt.OutputMode.All)
    if seed is not None:
        opts.randomSeed(int(seed))
    return opts


def annotate_pipeline(
    backbone: nn.Module,
    layers_per_ipu: Sequence[int],
    *,
    recompute: bool = True,
    poptorch: ModuleType | None = None,
) -> list[int]:
    """Mark pipeline stages on a timm ViT in place; returns the IPU of each block, in order.

    `patch_embed` (and the class token and position embeddings added right after it) begin IPU 0; block i
    begins `block_stages(layers_per_ipu)[i]`; `norm`, `fc_norm` and `head` (those that are not Identity) sit
    on the last IPU, and so does the loss computed on the logits after them (`AutoStage.SameAsIpu`).
    With `recompute`, every block but the last ends in a recomputation checkpoint.
    """
    pt = poptorch if poptorch is not None else require_poptorch()
    for name in ("patch_embed", "blocks", "head"):
        if not hasattr(backbone, name):
            raise ValueError(f"annotate_pipeline needs a timm ViT (patch_embed, blocks, head); no {name!r}")
    stages = block_stages(layers_per_ipu)
    blocks = backbone.blocks
    if len(stages) != len(blocks):
        raise PlanError(
            f"hardware.layers_per_ipu={list(layers_per_ipu)} places {len(stages)} blocks; the model has "
            f"{len(blocks)}"
        )
    last_ipu = len(layers_per_ipu) - 1
    backbone.patch_embed = pt.BeginBlock(backbone.patch_embed, "embeddings", ipu_id=0)
    for index, ipu in enumerate(stages):
        block = blocks[index]
        if recompute and index < len(blocks) - 1:
            block.register_forward_hook(_recomputation_hook(pt))
        blocks[index] = pt.BeginBlock(block, f"block{index}", ipu_id=ipu)
    for name in ("norm", "fc_norm", "head"):
        module = getattr(backbone, name, None)
        if isinstance(module, nn.Module) and not isinstance(module, nn.Identity):
            setattr(backbone, name, pt.BeginBlock(module, name, ipu_id=last_ipu))
    return stages


def _recomputation_hook(pt: ModuleType) -> Any:
    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return pt.recomputationCheckpoint(output)

    return hook


def _lightning_ipu_classes(config_name: str) -> tuple[str, Any, Any, Any]:
    """("core" | "graphcore", accelerator class, strategy class, precision class) from Lightning 2.0.x."""
    try:
        from lightning.pytorch.accelerators import IPUAccelerator
        from lightning.pytorch.plugins.precision import IPUPrecisionPlugin
        from lightning.pytorch.strategies import IPUStrategy

        return "core", IPUAccelerator, IPUStrategy, IPUPrecisionPlugin
    except ImportError:
        pass
    try:
        from lightning_graphcore import IPUAccelerator, IPUPrecision, IPUStrategy

        return "graphcore", IPUAccelerator, IPUStrategy, IPUPrecision
    except ImportError as error:
        import lightning

        raise IPUUnavailableError(
            f"hardware={config_name} needs {IPU_REQUIREMENTS}; this environment has lightning "
            f"{lightning.__version__}, which has no IPU strategy ({error})"
        ) from None


def ipu_trainer_arguments(
    plan: HardwarePlan,
    settings: IPUSettings | None = None,
    *,
    seed: int | None = None,
    gradient_clip_val: float | None = None,
) -> dict[str, Any]:
    """Trainer keyword arguments for an IPU plan: accelerator, strategy (with training and inference
    options), devices (= replicas), num_nodes, accumulate_grad_batches (1, see below), and precision (core
    Lightning) or a precision plugin (lightning-graphcore). Fails first, with one message, where the stack
    is missing."""
    if gradient_clip_val:
        raise PlanError(
            f"optim.gradient_clip_val={gradient_clip_val!r}: Lightning's IPU strategy cannot clip gradients; "
            "set it to null for IPU runs"
        )
    poptorch = require_poptorch(plan.name)
    flavour, accelerator_cls, strategy_cls, precision_cls = _lightning_ipu_classes(plan.name)
    strategy = strategy_cls(
        device_iterations=plan.device_iterations,
        training_opts=build_options(plan, settings, training=True, seed=seed, poptorch=poptorch),
        inference_opts=build_options(plan, settings, training=False, seed=seed, poptorch=poptorch),
    )
    arguments: dict[str, Any] = {
        "accelerator": accelerator_cls(),
        "strategy": strategy,
        "devices": plan.devices,
        "num_nodes": 1,
        # The accumulation happens on the device (Training.gradientAccumulation in the options): the
        # poptorch DataLoader hands over micro x replicas x accumulation images per host batch, and one
        # call of the training model takes the optimizer step. Lightning 2.0's loop must therefore step
        # every batch (its IPUStrategy does not set handles_gradient_accumulation), or the lr schedule and
        # global_step would advance once per `accumulation` optimizer steps.
        "accumulate_grad_batches": 1,
    }
    if flavour == "core":
        arguments["precision"] = plan.precision
    else:
        arguments["plugins"] = [precision_cls(plan.precision)]
    return arguments
