"""The hardware plan: arithmetic for every config (CPU, GPU, DDP from torchrun/SLURM, vPOD4/16/64), the fixed
global batch across pod sizes, every invalid combination stopping with one message, `xraycls plan`, and
the SLURM example composing to the plan its #SBATCH lines ask for."""

from __future__ import annotations

import ast
import json
import re
import shlex

import pytest
from _project import PROJECT_ROOT
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from xraycls.cli import main
from xraycls.hardware.plan import PlanError, plan_from_config, resolve_plan, trainer_arguments
from xraycls.training import hardware_plan

CONF_DIR = PROJECT_ROOT / "conf"
SBATCH = PROJECT_ROOT / "experiments" / "slurm" / "train_ddp.sbatch"
NO_LAUNCHER: dict[str, str] = {}


def config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize(
    ("pod", "replicas", "global_batch"), [("vpod4", 1, 128), ("vpod16", 4, 512), ("vpod64", 16, 2048)]
)
def test_pod_sizes_replicate_the_four_ipu_pipeline(pod: str, replicas: int, global_batch: int) -> None:
    plan = hardware_plan(config(f"hardware={pod}"), env=NO_LAUNCHER)
    assert (plan.accelerator, plan.strategy, plan.precision) == ("ipu", "ipu", "16-mixed")
    # Under the IPU strategy the Trainer's devices is the replication factor, not the IPU count.
    assert plan.devices == plan.replicas == replicas and plan.nodes == 1
    assert plan.ipus == 4 * replicas and plan.ipus_per_replica == 4
    assert plan.layers_per_ipu == (3, 3, 3, 3)
    assert (plan.micro_batch, plan.accumulation) == (1, 128)
    assert plan.global_batch == global_batch == plan.micro_batch * plan.replicas * plan.accumulation
    assert plan.samples_per_host_step == global_batch * plan.device_iterations
    assert plan.inference_device_iterations == 4
    assert plan.loader_batch == 1  # PopTorch's loader multiplies it by replicas x accumulation itself


@pytest.mark.parametrize(("pod", "accumulation"), [("vpod4", 128), ("vpod16", 32), ("vpod64", 8)])
def test_fixed_global_batch_derives_the_accumulation(pod: str, accumulation: int) -> None:
    plan = hardware_plan(config(f"hardware={pod}", "hardware.global_batch=128"), env=NO_LAUNCHER)
    assert plan.accumulation == accumulation and plan.global_batch == 128


def test_cpu_gpu_and_auto_keep_the_data_batch_as_the_step_batch() -> None:
    cpu = hardware_plan(config("hardware=cpu", "data.batch_size=32"), env=NO_LAUNCHER)
    assert trainer_arguments(cpu) == {
        "accelerator": "cpu",
        "strategy": "auto",
        "devices": 1,
        "num_nodes": 1,
        "precision": "32-true",
        "accumulate_grad_batches": 1,
    }
    assert (cpu.micro_batch, cpu.global_batch, cpu.loader_batch) == (32, 32, 32)
    gpu = hardware_plan(config("hardware=gpu", "hardware.devices=4", "trainer.accumulate_grad_batches=2"))
    assert (gpu.strategy, gpu.replicas, gpu.micro_batch, gpu.global_batch) == ("ddp", 4, 16, 128)
    assert gpu.precision == "bf16-mixed" and gpu.loader_batch == 64
    auto = resolve_plan("auto", accelerator="auto", precision="auto", cuda_devices=0, env=NO_LAUNCHER)
    assert (auto.accelerator, auto.precision) == ("cpu", "32-true")
    auto_gpu = resolve_plan("auto", accelerator="auto", precision="auto", cuda_devices=1, env=NO_LAUNCHER)
    assert (auto_gpu.accelerator, auto_gpu.precision) == ("gpu", "bf16-mixed")


def test_ddp_takes_its_size_from_torchrun_or_slurm() -> None:
    cfg = config("hardware=ddp", "data.batch_size=256")
    torchrun = hardware_plan(cfg, env={"LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "32"})
    assert (torchrun.devices, torchrun.nodes, torchrun.replicas, torchrun.source) == (8, 4, 32, "torchrun")
    assert torchrun.micro_batch == 8 and torchrun.strategy == "ddp"
    slurm = hardware_plan(cfg, env={"SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4(x2)"})
    assert (slurm.devices, slurm.nodes, slurm.replicas, slurm.source) == (4, 2, 8, "slurm")
    with pytest.raises(PlanError, match="WORLD_SIZE=10 is not a multiple of LOCAL_WORLD_SIZE=4"):
        hardware_plan(cfg, env={"LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "10"})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["hardware=vpod4", "hardware.pod_ipus=6"], r"pod_ipus=6 is not divisible by .*ipus_per_replica=4"),
        (["hardware=vpod4", "model=vit_tiny"], r"places 12 transformer blocks, but the model has 6"),
        (["hardware=vpod4", "hardware.layers_per_ipu=[6,6]"], r"layers_per_ipu=\[6, 6\] must list 4"),
        (["hardware=vpod16", "hardware.precision=bf16-mixed"], r"'bf16-mixed' is not supported on the IPU"),
        (["hardware=vpod16", "hardware.global_batch=130"], r"global_batch=130 cannot be reached: .* = 4"),
        (["hardware=gpu", "hardware.devices=3"], r"batch_size=64 .* not divisible by the 3 replicas"),
        (["hardware=gpu", "+hardware.device_iterations=4"], r"device_iterations=4 .* only the IPU"),
        (["hardware=cpu", "hardware.precision=fp8"], r"precision='fp8' is not one of"),
        (["hardware=cpu", "hardware.accelerator=tpu"], r"accelerator='tpu' is not one of"),
        (["hardware=cpu", "+hardware.replicas=2"], r"unknown hardware settings \['replicas'\]"),
        (["hardware=cpu", "hardware.micro_batch=0"], r"micro_batch must be a positive int, got 0"),
    ],
)
def test_invalid_combinations_stop_with_one_message(overrides: list[str], message: str) -> None:
    with pytest.raises(PlanError, match=message) as caught:
        hardware_plan(config(*overrides), env=NO_LAUNCHER)
    assert isinstance(caught.value, ValueError) and "\n" not in str(caught.value)


def test_the_plan_takes_the_model_depth_as_an_argument_and_imports_nothing_of_xraycls() -> None:
    ipu = {"accelerator": "ipu", "pod_ipus": 4, "ipus_per_replica": 4, "layers_per_ipu": [3, 3, 3, 3]}
    plain = {"hardware": ipu}
    assert plan_from_config(plain, env=NO_LAUNCHER, model_depth=12).layers_per_ipu == (3, 3, 3, 3)
    with pytest.raises(PlanError, match="but the model has 6"):
        plan_from_config(plain, env=NO_LAUNCHER, model_depth=6)
    tree = ast.parse((PROJECT_ROOT / "xraycls" / "hardware" / "plan.py").read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    nodes = [node for node in ast.walk(tree) if isinstance(node, ast.Import)]
    imported += [alias.name for node in nodes for alias in node.names]
    assert not [name for name in imported if name and name.startswith("xraycls")]


def test_cli_prints_the_resolved_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "hardware=vpod16", "hardware.global_batch=128"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["devices"] == 4 and printed["accumulation"] == 32 and printed["global_batch"] == 128
    assert printed["layers_per_ipu"] == [3, 3, 3, 3] and printed["ipu"]["matmul_proportion"] == 0.3


def test_cli_reports_a_bad_override_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "hardware=vpod8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "hardware/vpod8" in err and "vpod16" in err
    assert main(["plan", "hardware=vpod4", "hardware.precision=bf16-mixed"]) == 2
    assert "not supported on the IPU" in capsys.readouterr().err


def test_slurm_example_composes_to_the_plan_its_sbatch_lines_ask_for() -> None:
    text = SBATCH.read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, flags=re.MULTILINE))
    command = shlex.split(re.search(r"^srun (.+?)(?<!\\)$", text.replace("\\\n", " "), re.MULTILINE).group(1))
    overrides = [arg for arg in command if "=" in arg and not arg.startswith(("hydra.", '"'))]
    assert "hardware=ddp" in overrides
    env = {"SLURM_NNODES": sbatch["nodes"], "SLURM_NTASKS_PER_NODE": sbatch["ntasks-per-node"]}
    plan = hardware_plan(config(*overrides), env=env)
    assert plan.nodes == int(sbatch["nodes"]) and plan.devices == int(sbatch["ntasks-per-node"])
    assert plan.devices == int(sbatch["gpus-per-node"])  # one task per GPU, as Lightning expects
    assert plan.replicas == 8 and plan.accelerator == "gpu" and plan.strategy == "ddp"
    assert plan.global_batch == 128 and plan.micro_batch == 16  # official_split's 128 over 8 GPUs
