"""Checkpoints never run code: the three shapes of malicious file are refused and their payload never runs.

Runs on the main stack and on the legacy IPU stack (`make test-legacy`: torch 2.0.1, whose `torch.load`
unpickles everything unless told otherwise, and Lightning 2.0.9, which does not tell it).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _project import PROJECT_ROOT

from xraycls.model.checkpoint import CheckpointError, open_checkpoint


class _Payload:
    """Unpickling this makes the folder `marker`: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.makedirs, (str(self.marker),))


def _genuine_checkpoint() -> dict:
    """What Lightning writes, in shape: tensors, plain containers, numbers and strings."""
    return {
        "epoch": 1,
        "global_step": 50,
        "pytorch-lightning_version": "2.0.9",
        "state_dict": {"backbone.head.weight": torch.zeros(15, 8)},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(50.0)}}, "param_groups": [{"lr": 1e-3}]}],
        "lr_schedulers": [{"last_epoch": 50}],
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val/auroc_macro14'}": {"best_model_score": torch.tensor(0.9)}
        },
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 2}}}},
        "hparams_name": "kwargs",
        "hyper_parameters": {"backbone": "test_vit", "lr": 2e-3, "betas": [0.9, 0.999]},
    }


def _write(shape: str, path: Path, marker: Path) -> None:
    if shape == "raw pickle":
        # Protocol 2, torch's own: the restricted unpickler reads up to the object it must refuse.
        path.write_bytes(pickle.dumps({"state_dict": {}, "payload": _Payload(marker)}, protocol=2))
    elif shape == "torch zip":
        torch.save({"payload": _Payload(marker)}, path)
    else:  # a genuine checkpoint with one injected object
        contents = _genuine_checkpoint()
        contents["hyper_parameters"]["weights"] = _Payload(marker)
        torch.save(contents, path)


@pytest.mark.parametrize("shape", ["raw pickle", "torch zip", "genuine checkpoint + one object"])
def test_malicious_checkpoint_is_refused_and_its_payload_never_runs(tmp_path: Path, shape: str) -> None:
    path, marker = tmp_path / "evil.ckpt", tmp_path / "payload_ran"
    _write(shape, path, marker)
    with pytest.raises(CheckpointError) as error:
        open_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"checkpoint {path}: refused") and "\n" not in message
    assert not marker.exists()


def test_genuine_checkpoint_opens(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    torch.save(_genuine_checkpoint(), path)
    contents = open_checkpoint(path)
    assert contents["global_step"] == 50
    assert torch.equal(contents["state_dict"]["backbone.head.weight"], torch.zeros(15, 8))


def test_truncated_last_checkpoint_names_the_best_one_to_resume_from(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    torch.save(_genuine_checkpoint(), path)
    path.write_bytes(path.read_bytes()[:300])
    best = tmp_path / "best-epoch03.ckpt"
    torch.save(_genuine_checkpoint(), best)
    with pytest.raises(CheckpointError) as error:
        open_checkpoint(path)
    message = str(error.value)
    assert message.startswith(f"checkpoint {path}: unreadable, truncated") and "\n" not in message
    assert message.endswith(f"resume from an earlier one instead: ckpt_path={best}")


def test_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        open_checkpoint(tmp_path / "nope.ckpt")
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"notes\.ckpt: unreadable"):
        open_checkpoint(text)
    tensor = tmp_path / "tensor.ckpt"
    torch.save(torch.zeros(2), tensor)
    with pytest.raises(CheckpointError, match="holds a Tensor, not a checkpoint mapping"):
        open_checkpoint(tensor)


def test_load_from_checkpoint_refuses_a_malicious_file_before_lightning_opens_it(tmp_path: Path) -> None:
    from xraycls.model.module import XrayClassifier

    path, marker = tmp_path / "evil.ckpt", tmp_path / "payload_ran"
    _write("genuine checkpoint + one object", path, marker)
    with pytest.raises(CheckpointError, match="refused"):
        XrayClassifier.load_from_checkpoint(path, weights="none")
    assert not marker.exists()


@pytest.fixture(scope="module")
def small_demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """paths.data_dir with a small synthetic demo/raw: the refusal comes before any of it is read."""
    from xraycls.data.synthetic import make_synthetic_nih

    data = tmp_path_factory.mktemp("data")
    make_synthetic_nih(data / "demo" / "raw", 40, size=64, seed=0, min_prevalence=0.08)
    return data


def _train(data: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(PROJECT_ROOT / "train.py"), "experiment=demo", f"paths.data_dir={data}"]
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    return subprocess.run(
        [*command, *overrides], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("shape", ["raw pickle", "torch zip", "genuine checkpoint + one object"])
def test_train_py_refuses_a_malicious_checkpoint_and_never_runs_it(
    small_demo_data: Path, tmp_path: Path, shape: str
) -> None:
    """`ckpt_path=evil.ckpt` given, and the same file planted as a run directory's last.ckpt (auto-resume)."""
    evil, marker = tmp_path / "evil.ckpt", tmp_path / "payload_ran"
    _write(shape, evil, marker)
    planted = tmp_path / "run"
    (planted / "checkpoints").mkdir(parents=True)
    (planted / "checkpoints" / "last.ckpt").write_bytes(evil.read_bytes())
    for overrides in ([f"ckpt_path={evil}", f"paths.runs_dir={tmp_path}/runs"], [f"hydra.run.dir={planted}"]):
        result = _train(small_demo_data, *overrides)
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2 and last.startswith("train.py: error: checkpoint "), result.stderr[
            -1500:
        ]
        assert "refused" in last and "Traceback" not in result.stderr
        assert not marker.exists(), f"the payload ran ({overrides})"
    assert not list((tmp_path / "runs").rglob("*"))  # no run folder left by the refused run
    assert sorted(p.name for p in planted.iterdir()) == [
        ".hydra",
        "checkpoints",
        "train.log",
    ]
