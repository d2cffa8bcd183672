"""summary.json helpers: versions of the real installed stack, JSON conversion, atomic writes."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import platform
from pathlib import Path

import numpy as np
import pytest
import torch

import xraycls
from xraycls.files import to_jsonable, write_json
from xraycls.training.summary import collect_versions


def test_collect_versions_reports_the_running_stack() -> None:
    import albumentations
    import lightning
    import timm
    import torchmetrics

    versions = collect_versions()
    assert versions["python"] == platform.python_version()
    assert versions["torch"] == torch.__version__
    assert versions["lightning"] == lightning.__version__
    assert versions["timm"] == timm.__version__
    assert versions["torchmetrics"] == torchmetrics.__version__
    assert versions["albumentations"] == albumentations.__version__
    assert versions["numpy"] == np.__version__
    assert versions["xraycls"] == xraycls.__version__
    if torch.cuda.is_available():
        assert versions["cuda"] == torch.version.cuda and len(versions["devices"]) >= 1
    else:
        assert versions["cuda"] is None and versions["devices"] == []
    json.dumps(versions, allow_nan=False)  # plain JSON as is


class Split(enum.Enum):
    OFFICIAL = "official"


@dataclasses.dataclass
class Plan:
    devices: int
    precision: str


def test_to_jsonable_converts_tensors_numpy_and_non_finite_numbers() -> None:
    payload = {
        "loss": torch.tensor(0.25),
        "per_label": torch.tensor([0.5, float("nan")]),
        "np_nan": np.float32("nan"),
        "np_int": np.int64(7),
        "np_bool": np.bool_(True),
        "inf": float("inf"),
        "array": np.array([[1, 2], [3, 4]], dtype=np.uint8),
        "path": Path("/runs/a"),
        "pair": (1, -math.inf),
        "set": {"b", "a"},
        "split": Split.OFFICIAL,
        "plan": Plan(devices=2, precision="bf16-mixed"),
        3: "numeric key",
        "nested": {"ok": [None, True, "x"]},
    }
    assert to_jsonable(payload) == {
        "loss": 0.25,
        "per_label": [0.5, None],
        "np_nan": None,
        "np_int": 7,
        "np_bool": True,
        "inf": None,
        "array": [[1, 2], [3, 4]],
        "path": "/runs/a",
        "pair": [1, None],
        "set": ["a", "b"],
        "split": "official",
        "plan": {"devices": 2, "precision": "bf16-mixed"},
        "3": "numeric key",
        "nested": {"ok": [None, True, "x"]},
    }
    assert type(to_jsonable(np.int64(7))) is int and type(to_jsonable(torch.tensor(0.25))) is float


def test_to_jsonable_names_where_an_unknown_value_sits() -> None:
    with pytest.raises(TypeError, match=r"metrics\.test\[1\]: a object cannot be written to JSON"):
        to_jsonable({"metrics": {"test": [1, object()]}})


def test_write_json_round_trips_and_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "run" / "summary.json"
    write_json(path, {"auroc": np.float64(0.8), "missing": float("nan")})
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == {"auroc": 0.8, "missing": None}
    assert text.startswith('{\n  "auroc"') and text.endswith("\n")  # indent 2
    assert "NaN" not in text

    write_json(path, {"auroc": 0.9})
    assert json.loads(path.read_text(encoding="utf-8")) == {"auroc": 0.9}
    # Same permissions as any file this process creates (not mkstemp's private 0600).
    reference = tmp_path / "run" / "reference.txt"
    reference.write_text("x")
    assert path.stat().st_mode == reference.stat().st_mode
    assert sorted(p.name for p in path.parent.iterdir()) == ["reference.txt", "summary.json"]


def test_write_json_failure_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    write_json(path, {"auroc": 0.9})
    with pytest.raises(TypeError, match="model"):
        write_json(path, {"model": torch.nn.Linear(1, 1)})
    assert json.loads(path.read_text(encoding="utf-8")) == {"auroc": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left behind
