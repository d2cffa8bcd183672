"""The hardware plan: one resolved answer to "where does this run, and how is the batch cut?".

Every target (the CPU, one or more GPUs, DDP over nodes, IPU pods) resolves to the same `HardwarePlan`.
Batch terms, per optimizer step:

    global_batch = micro_batch x replicas x accumulation

- `micro_batch`: images one replica pushes through the model per forward pass.
- `replicas`: data-parallel copies of the model. GPU/CPU: devices x nodes (one process each).
  IPU: the pod's IPUs / `ipus_per_replica` (each replica is a ViT pipelined over `ipus_per_replica` IPUs);
  under Lightning's IPU strategy the Trainer's `devices` IS this replication factor, not the IPU count.
- `accumulation`: micro-batches summed into one optimizer step. With `global_batch` set, it is derived
  (global_batch / (micro_batch x replicas)), so a vPOD4 and a vPOD16 run take the same optimizer steps.
- `samples_per_host_step`: images the host hands over per call into the device. IPU: PopTorch loads
  micro x replicas x accumulation x device_iterations per call; elsewhere one step of every replica.
- `loader_batch`: what `NIHDataModule(batch_size=...)` gets. The DataModule divides it by the Trainer's
  world size; the IPU strategy runs as one process (world size 1) and PopTorch's loader multiplies the
  micro-batch by replicas, accumulation and device iterations itself, so there it is the micro-batch.
- `cpu_threads`: torch's intra-op threads per process (`resolve_cpu_threads`: `auto` on the CPU takes the
  cores left after DataLoader workers, no more than are idle when the run starts, because OpenMP threads
  spin-waiting for a descheduled sibling make a busy machine several times slower than one thread).

Plain keyword arguments in, a frozen dataclass out; no Hydra here. A wrong combination raises
`PlanError` (a ValueError) naming the setting and the bad value, before any data or weights are touched.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "HardwarePlan",
    "PlanError",
    "IDLE_CORE",
    "IPU_PRECISIONS",
    "PLAN_KEYS",
    "plan_from_config",
    "resolve_cpu_threads",
    "resolve_plan",
    "resolve_precision",
    "trainer_arguments",
]

log = logging.getLogger(__name__)

ACCELERATORS = ("auto", "cpu", "gpu", "ipu")
# Trainer precision strings (Lightning 2.x); short aliases are normalised to these.
PRECISIONS = ("64-true", "32-true", "16-mixed", "16-true", "bf16-mixed", "bf16-true")
_PRECISION_ALIASES = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}
# What Lightning's IPUPrecision(Plugin) accepts; the IPU has no bf16 arithmetic.
IPU_PRECISIONS = ("32-true", "16-mixed", "16-true")
# hardware.cpu_threads=auto: the idle fraction at which a core counts as free for one more thread.
IDLE_CORE = 0.75


class PlanError(ValueError):
    """A hardware setting that cannot work; the message names the setting, the value and the fix."""


@dataclass(frozen=True)
class HardwarePlan:
    """The resolved plan (see the module docstring for the batch terms). `to_dict()` is its JSON form."""

    name: str  # the config's name: cpu, gpu, ddp, vpod16, ...
    accelerator: str  # cpu | gpu | ipu (auto already resolved)
    strategy: str  # auto | ddp | ipu
    devices: int  # Trainer `devices`: per node (IPU: the replication factor)
    nodes: int  # Trainer `num_nodes`
    replicas: int  # data-parallel copies of the model
    ipus_per_replica: int | None  # IPU only: IPUs one pipelined model spans
    ipus: int | None  # IPU only: replicas x ipus_per_replica (the pod size)
    layers_per_ipu: tuple[int, ...] | None  # IPU only: transformer blocks on each IPU of a replica
    micro_batch: int  # images per replica per forward pass
    accumulation: int  # micro-batches per optimizer step
    device_iterations: int  # training steps per host call (IPU); 1 elsewhere
    inference_device_iterations: int  # evaluation batches per host call (IPU); 1 elsewhere
    global_batch: int  # images per optimizer step = micro_batch x replicas x accumulation
    samples_per_host_step: int  # images per host call into the device, training
    loader_batch: int  # the DataModule's batch_size (see module docstring)
    precision: str  # Lightning precision string
    source: str  # where devices/nodes came from: config | torchrun | slurm | cuda
    cpu_threads: int | None = None  # torch intra-op threads per process; None: torch's default
    cpu_threads_source: str = "torch"  # auto | config | torch (left to torch's default)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.layers_per_ipu is not None:
            data["layers_per_ipu"] = list(self.layers_per_ipu)
        return data


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanError(f"hardware.{name} must be a positive int, got {value!r}")
    return value


def resolve_cpu_threads(
    setting: int | str | None,
    *,
    accelerator: str,
    cores: int,
    idle: float | None = None,
    workers: int = 0,
    processes: int = 1,
) -> tuple[int | None, str]:
    """(threads, source) for `hardware.cpu_threads`: a positive int is used as given ("config"); `auto` on
    the CPU ("auto") is the process's share of the `cores` (cores // processes) less its DataLoader `workers`
    (each runs one thread), and no more than its share of the cores `idle` now, a core counting when at
    least 3/4 idle (`IDLE_CORE`); at least 1. `auto` on a GPU or IPU leaves torch's default (None, "torch").
    `idle` None: unknown, taken as all idle.

    Why 3/4, not 1/2: one thread too many beside a busy process made the demo 3-4x slower, one too few on a
    quiet machine 1.3x (experiments/results/cpu_under_load_*.md). Raises PlanError for anything else than
    `auto` or a positive int (0, -1, "x", true).
    """
    if setting == "auto":
        if accelerator != "cpu":
            return None, "torch"
        share = max(1, cores // max(1, processes) - max(0, workers))
        if idle is not None:
            share = min(share, max(1, math.floor(idle / max(1, processes) + 1.0 - IDLE_CORE)))
        return share, "auto"
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise PlanError(f"hardware.cpu_threads must be 'auto' or a positive int, got {setting!r}")
    return setting, "config"


def resolve_precision(precision: str | int | None, accelerator: str) -> str:
    """`auto`/None -> bf16-mixed on a GPU, 16-mixed on an IPU, 32-true on the CPU; aliases normalised.

    Raises PlanError for an unknown string and for bf16 on the IPU.
    """
    if precision in (None, "auto"):
        precision = {"gpu": "bf16-mixed", "ipu": "16-mixed"}.get(accelerator, "32-true")
    value = _PRECISION_ALIASES.get(str(precision), str(precision))
    if value not in PRECISIONS:
        raise PlanError(f"hardware.precision={precision!r} is not one of {list(PRECISIONS)} or 'auto'")
    if accelerator == "ipu" and value not in IPU_PRECISIONS:
        raise PlanError(
            f"hardware.precision={precision!r} is not supported on the IPU (Lightning's IPUPrecision takes "
            f"{list(IPU_PRECISIONS)}; the IPU has no bf16): use 16-mixed"
        )
    return value


def _first_count(value: str) -> int | None:
    """SLURM writes task counts as '4', '4(x2)' or '4,2': the first number (this node's, usually)."""
    match = re.match(r"\s*(\d+)", value)
    return int(match.group(1)) if match else None


def _devices_and_nodes(
    devices: int | None, nodes: int | None, env: Mapping[str, str], cuda_devices: int
) -> tuple[int, int, str]:
    """devices/nodes from the config, else from torchrun's or SLURM's environment, else the visible GPUs."""
    source = "config"
    if devices is None:
        if "LOCAL_WORLD_SIZE" in env:
            devices, source = int(env["LOCAL_WORLD_SIZE"]), "torchrun"
        elif "SLURM_NTASKS_PER_NODE" in env and _first_count(env["SLURM_NTASKS_PER_NODE"]):
            devices, source = _first_count(env["SLURM_NTASKS_PER_NODE"]), "slurm"
        else:
            devices, source = max(cuda_devices, 1), "cuda"
    if nodes is None:
        if "WORLD_SIZE" in env and "LOCAL_WORLD_SIZE" in env:
            world, local = int(env["WORLD_SIZE"]), int(env["LOCAL_WORLD_SIZE"])
            if world % local:
                raise PlanError(f"torchrun: WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local}")
            nodes, source = world // local, "torchrun"
        elif "SLURM_NNODES" in env:
            nodes, source = int(env["SLURM_NNODES"]), "slurm"
        else:
            nodes = 1
    return _positive("devices", devices), _positive("nodes", nodes), source


def _resolve_accelerator(accelerator: str, cuda_devices: int | None) -> tuple[str, int]:
    """`auto` -> gpu where CUDA sees a device, else cpu; the visible CUDA devices counted only when needed."""
    if accelerator not in ACCELERATORS:
        raise PlanError(f"hardware.accelerator={accelerator!r} is not one of {list(ACCELERATORS)}")
    if cuda_devices is None or accelerator == "auto":
        import torch  # only here: the plan stays importable without touching CUDA

        cuda_devices = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    if accelerator == "auto":
        accelerator = "gpu" if cuda_devices > 0 else "cpu"
    return accelerator, cuda_devices


@dataclass(frozen=True)
class _Placement:
    """Where the replicas run: the Trainer's devices/nodes/strategy and, on the IPU, the pod layout."""

    devices: int
    nodes: int
    replicas: int
    strategy: str
    source: str
    ipus_per_replica: int | None = None
    ipus: int | None = None
    layers: tuple[int, ...] | None = None


def _ipu_placement(
    nodes: int | None,
    pod_ipus: Any,
    ipus_per_replica: Any,
    layers_per_ipu: Sequence[int] | None,
    model_depth: int | None,
) -> _Placement:
    """One host, `pod_ipus / ipus_per_replica` replicas (the Trainer's devices), each a ViT pipelined over
    `ipus_per_replica` IPUs holding `layers_per_ipu` blocks."""
    if nodes not in (None, 1):
        raise PlanError(f"hardware.nodes={nodes!r}: Lightning's IPU strategy runs on one host; use 1")
    pod_ipus = _positive("pod_ipus", pod_ipus)
    ipus_per_replica = _positive("ipus_per_replica", ipus_per_replica)
    if pod_ipus % ipus_per_replica:
        raise PlanError(
            f"hardware.pod_ipus={pod_ipus} is not divisible by hardware.ipus_per_replica={ipus_per_replica}: "
            "every replica needs the same number of IPUs"
        )
    if layers_per_ipu is None:
        raise PlanError("hardware.layers_per_ipu is required on the IPU (transformer blocks per IPU)")
    layers = tuple(int(n) for n in layers_per_ipu)
    if len(layers) != ipus_per_replica or any(n < 0 for n in layers):
        raise PlanError(
            f"hardware.layers_per_ipu={list(layers)} must list {ipus_per_replica} non-negative counts "
            f"(one per IPU of a replica, hardware.ipus_per_replica={ipus_per_replica})"
        )
    if model_depth is not None and sum(layers) != model_depth:
        raise PlanError(
            f"hardware.layers_per_ipu={list(layers)} places {sum(layers)} transformer blocks, but the model "
            f"has {model_depth}; the counts must sum to the model depth"
        )
    replicas = pod_ipus // ipus_per_replica
    return _Placement(replicas, 1, replicas, "ipu", "config", ipus_per_replica, pod_ipus, layers)


def _process_placement(
    devices: int | None,
    nodes: int | None,
    device_iterations: int,
    inference_iterations: int,
    env: Mapping[str, str],
    cuda_devices: int,
) -> _Placement:
    """CPU/GPU: one process per device on each node; DDP as soon as there is more than one replica."""
    if device_iterations != 1 or inference_iterations != 1:
        raise PlanError(
            f"hardware.device_iterations={device_iterations} / inference_device_iterations="
            f"{inference_iterations}: only the IPU runs several steps per host call; use 1"
        )
    devices_, nodes_, source = _devices_and_nodes(devices, nodes, env, cuda_devices)
    replicas = devices_ * nodes_
    return _Placement(devices_, nodes_, replicas, "ddp" if replicas > 1 else "auto", source)


def _micro_batch(batch_size: int, micro_batch: int | None, replicas: int) -> int:
    """The explicit micro-batch, else the data's step batch shared out over the replicas."""
    if micro_batch is None:
        if batch_size % replicas:
            raise PlanError(
                f"data.batch_size={batch_size} (the batch per step over all replicas) is not divisible by "
                f"the {replicas} replicas; choose a multiple of {replicas} or set hardware.micro_batch"
            )
        micro_batch = batch_size // replicas
    return _positive("micro_batch", micro_batch)


def _accumulation(accumulation: int, global_batch: int | None, micro_batch: int, replicas: int) -> int:
    """The configured accumulation, unless `global_batch` is set: then global / (micro x replicas)."""
    per_step = micro_batch * replicas
    if global_batch is not None:
        global_batch = _positive("global_batch", global_batch)
        if global_batch % per_step:
            raise PlanError(
                f"hardware.global_batch={global_batch} cannot be reached: micro_batch {micro_batch} x "
                f"replicas {replicas} = {per_step} images per step does not divide it; choose a multiple "
                f"of {per_step} or another micro_batch"
            )
        derived = global_batch // per_step
        if derived != accumulation:
            log.info("accumulation %d from global_batch %d (not %d)", derived, global_batch, accumulation)
        accumulation = derived
    return _positive("accumulation", accumulation)


def resolve_plan(
    name: str = "cpu",
    *,
    accelerator: str = "cpu",
    devices: int | None = 1,
    nodes: int | None = 1,
    precision: str | int | None = "auto",
    batch_size: int = 64,
    micro_batch: int | None = None,
    accumulation: int = 1,
    global_batch: int | None = None,
    device_iterations: int = 1,
    inference_device_iterations: int | None = None,
    pod_ipus: int | None = None,
    ipus_per_replica: int | None = None,
    layers_per_ipu: Sequence[int] | None = None,
    model_depth: int | None = None,
    env: Mapping[str, str] | None = None,
    cuda_devices: int | None = None,
    cpu_threads: int | str = "auto",
    loader_workers: int = 0,
    cores: int | None = None,
    idle_cores: float | None = None,
) -> HardwarePlan:
    """Resolve one target into a `HardwarePlan`; raises PlanError (a ValueError) for any bad combination.

    `batch_size` is the data config's batch per step over all replicas; it gives `micro_batch` when that is
    None. `accumulation` is used unless `global_batch` is set, which derives it. `devices`/`nodes` None (DDP)
    come from torchrun (LOCAL_WORLD_SIZE, WORLD_SIZE) or SLURM (SLURM_NTASKS_PER_NODE, SLURM_NNODES) in
    `env` (default os.environ), else the `cuda_devices` visible. IPU (`accelerator="ipu"`) needs `pod_ipus`,
    `ipus_per_replica` and `layers_per_ipu` summing to `model_depth` (when given). `cpu_threads`: see
    `resolve_cpu_threads`, with `loader_workers` (data.num_workers), the `cores` this process may use
    (default: its affinity mask) and the `idle_cores` now (default None: unknown; `xraycls.hardware.threads`
    reads them).
    """
    accelerator, cuda_devices = _resolve_accelerator(accelerator, cuda_devices)
    if env is None:
        import os

        env = os.environ
    batch_size = _positive("batch_size (data.batch_size)", batch_size)
    device_iterations = _positive("device_iterations", device_iterations)
    inference_iterations = _positive(
        "inference_device_iterations",
        device_iterations if inference_device_iterations is None else inference_device_iterations,
    )
    resolved_precision = resolve_precision(precision, accelerator)
    on_ipu = accelerator == "ipu"
    if on_ipu:
        place = _ipu_placement(nodes, pod_ipus, ipus_per_replica, layers_per_ipu, model_depth)
    else:
        place = _process_placement(devices, nodes, device_iterations, inference_iterations, env, cuda_devices)
    micro_batch = _micro_batch(batch_size, micro_batch, place.replicas)
    accumulation = _accumulation(accumulation, global_batch, micro_batch, place.replicas)
    per_step = micro_batch * place.replicas
    if cores is None:
        import os

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads, threads_source = resolve_cpu_threads(
        cpu_threads,
        accelerator=accelerator,
        cores=cores,
        idle=idle_cores,
        workers=loader_workers,
        processes=place.devices if place.strategy == "ddp" else 1,
    )
    return HardwarePlan(
        name=str(name),
        accelerator=accelerator,
        strategy=place.strategy,
        devices=place.devices,
        nodes=place.nodes,
        replicas=place.replicas,
        ipus_per_replica=place.ipus_per_replica,
        ipus=place.ipus,
        layers_per_ipu=place.layers,
        micro_batch=micro_batch,
        accumulation=accumulation,
        device_iterations=device_iterations,
        inference_device_iterations=inference_iterations,
        global_batch=per_step * accumulation,
        samples_per_host_step=per_step * (accumulation * device_iterations if on_ipu else 1),
        loader_batch=micro_batch if on_ipu else per_step,
        precision=resolved_precision,
        source=place.source,
        cpu_threads=threads,
        cpu_threads_source=threads_source,
    )


def trainer_arguments(plan: HardwarePlan) -> dict[str, Any]:
    """Trainer keyword arguments for a CPU/GPU plan (accelerator, strategy, devices, num_nodes, precision,
    accumulate_grad_batches). IPU plans need PopTorch objects: see `ipu.ipu_trainer_arguments`."""
    if plan.accelerator == "ipu":
        raise PlanError("IPU Trainer arguments come from xraycls.hardware.ipu.ipu_trainer_arguments")
    return {
        "accelerator": plan.accelerator,
        "strategy": plan.strategy,
        "devices": plan.devices,
        "num_nodes": plan.nodes,
        "precision": plan.precision,
        "accumulate_grad_batches": plan.accumulation,
    }


# Keys of a `hardware` config node that resolve_plan takes (plus `ipu`, the IPU-only settings).
PLAN_KEYS = (
    "name",
    "accelerator",
    "devices",
    "nodes",
    "precision",
    "micro_batch",
    "accumulation",
    "global_batch",
    "device_iterations",
    "inference_device_iterations",
    "pod_ipus",
    "ipus_per_replica",
    "layers_per_ipu",
    "cpu_threads",
)


def plan_from_config(
    config: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    model_depth: int | None = None,
    cores: int | None = None,
    idle_cores: float | None = None,
) -> HardwarePlan:
    """The plan of a whole resolved run config as plain containers (`hardware`, `data.batch_size`,
    `data.num_workers`, `trainer.accumulate_grad_batches`). `model_depth`: the transformer blocks an IPU
    layout must sum to (None: not checked); the caller computes it (`xraycls.model.backbone.backbone_depth`).
    `cores` / `idle_cores`: the machine for `hardware.cpu_threads=auto` (see `resolve_plan`).

    `hardware.accumulation` null means the trainer's `accumulate_grad_batches`. Unknown `hardware` keys
    raise PlanError (a typo must not silently fall back to a default).
    """
    hardware = dict(config.get("hardware") or {})
    hardware.pop("ipu", None)
    unknown = sorted(set(hardware) - set(PLAN_KEYS))
    if unknown:
        raise PlanError(f"unknown hardware settings {unknown}; known: {list(PLAN_KEYS)} and ipu")
    if hardware.get("accumulation") is None:
        hardware["accumulation"] = int((config.get("trainer") or {}).get("accumulate_grad_batches") or 1)
    data = config.get("data") or {}
    return resolve_plan(
        **{key: value for key, value in hardware.items() if value is not None or key in ("devices", "nodes")},
        batch_size=data.get("batch_size", 64),
        loader_workers=int(data.get("num_workers") or 0),
        model_depth=model_depth,
        env=env,
        cores=cores,
        idle_cores=idle_cores,
    )
