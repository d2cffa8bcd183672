"""Checkpoints never run code: the three shapes of malicious file are refused and their payload never runs.

Runs on the main stack and on the legacy IPU stack (`make test-legacy`: torch 2.0.1, whose `torch.load`
unpickles everything unless told otherwise, and Lightning 2.0.9, which does not tell it).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

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
