"""ONNX export of a tiny bundle through the CLI: ONNX Runtime reproduces the bundle's probabilities on real
PNG files, the metadata carries labels/preprocessing/thresholds, and a graph that differs from PyTorch is
refused with nothing left under the final name."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from xraycls.cli import main
from xraycls.data.images import load_xray
from xraycls.findings import LABELS, NUM_LABELS
from xraycls.inference.bundle import ModelBundle, export_bundle, load_bundle, make_preprocessing
from xraycls.inference.onnx_export import ONNX_INPUT, ONNX_OUTPUT, OnnxMismatchError, export_onnx
from xraycls.model.backbone import create_backbone

# Not the default 0.5/0.5, and a cache size other than the input size: an export ignoring either would fail.
PREP = make_preprocessing(image_size=80, input_size=64, mean=0.45, std=0.3)
THRESHOLDS = {"method": "youden", "per_finding": {name: {"threshold": 0.4} for name in LABELS}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bundle_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_backbone: str, tiny_backbone_kwargs: dict
) -> Path:
    kwargs = {"num_classes": NUM_LABELS, **tiny_backbone_kwargs}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_backbone(tiny_backbone, weights="none", **kwargs)
        # A wider head than timm's small init: clearly non-zero logits make the comparison meaningful.
        torch.nn.init.normal_(model.head.weight, std=0.5)
    return export_bundle(
        model,
        tmp_path_factory.mktemp("run") / "model",
        backbone_name=tiny_backbone,
        backbone_kwargs=kwargs,
        preprocessing=PREP,
        metrics={"test": {"split": "official", "auroc_macro14": 0.8}},
        extra={"thresholds": THRESHOLDS},
    )


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def exported(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("onnx") / "xray.onnx"
    code, stdout, stderr = _cli("export", "--model", str(bundle_dir), "--onnx", str(out))
    assert code == 0, stderr
    return out, json.loads(stdout)


def test_cli_writes_the_file_and_reports_the_check(exported: tuple[Path, dict]) -> None:
    out, report = exported
    assert report["path"] == str(out) and out.stat().st_size == report["bytes"] > 100_000
    assert 0 <= report["max_abs_diff"] <= report["atol"] == 1e-4
    assert report["checked_batches"] == [4, 1]
    assert report["exporter"] == "torch.onnx.export(dynamo=True)" and report["opset"] >= 17
    assert report["input"] == {"name": ONNX_INPUT, "shape": ["batch", 3, 64, 64], "dtype": "float32"}
    assert report["output"]["shape"] == ["batch", NUM_LABELS]
    assert sorted(p.name for p in out.parent.iterdir()) == ["xray.onnx"]  # no temporary or data file


def test_onnx_reproduces_the_bundles_probabilities_on_png_files(
    exported: tuple[Path, dict], bundle_dir: Path, tmp_path: Path
) -> None:
    """Three real PNGs of other sizes, decoded as predict does; a batch of 3, a size the check did not use."""
    out, _report = exported
    bundle = load_bundle(bundle_dir)
    rng = np.random.default_rng(3)
    images = []
    for i, shape in enumerate([(120, 100), (200, 200), (60, 90)]):
        path = tmp_path / f"x{i}.png"
        assert cv2.imwrite(str(path), rng.integers(0, 256, shape, dtype=np.uint8))
        images.append(load_xray(path, PREP["image_size"]))
    expected = bundle.predict_proba(images)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [ONNX_INPUT]
    assert isinstance(session.get_inputs()[0].shape[0], str)  # the batch axis is symbolic
    (logits,) = session.run([ONNX_OUTPUT], {ONNX_INPUT: bundle.preprocess(images).numpy()})
    probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    assert np.abs(expected - 0.5).max() > 0.05  # the comparison is not between two constant outputs
    np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)


def test_metadata_carries_labels_preprocessing_thresholds_and_disclaimer(
    exported: tuple[Path, dict], bundle_dir: Path, tiny_backbone: str
) -> None:
    out, _report = exported
    props = {entry.key: entry.value for entry in onnx.load(str(out)).metadata_props}
    assert json.loads(props["labels"]) == list(LABELS)
    assert json.loads(props["preprocessing"]) == load_bundle(bundle_dir).preprocessing
    assert json.loads(props["thresholds"]) == THRESHOLDS
    assert json.loads(props["metrics"])["test"]["auroc_macro14"] == 0.8
    assert "radiologist" in props["disclaimer"] and props["source_backbone"] == tiny_backbone


class _DiffersInExport(torch.nn.Module):
    """The bundle's model, plus 1e-3 on every logit only while exported: a graph that is not PyTorch's."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.inner(x)
        return logits + 1e-3 if torch.onnx.is_in_onnx_export() else logits


def test_a_mismatch_is_refused_and_leaves_the_earlier_file(bundle_dir: Path, tmp_path: Path) -> None:
    bundle = load_bundle(bundle_dir)
    # A one-layer model keeps this second export cheap; the check does not depend on the architecture.
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64 * 64, NUM_LABELS))
    odd = ModelBundle(
        model=_DiffersInExport(linear), labels=bundle.labels, preprocessing=bundle.preprocessing, config={}
    )
    out = tmp_path / "model.onnx"
    out.write_bytes(b"an earlier export")
    with pytest.raises(
        OnnxMismatchError, match=r"does not reproduce PyTorch: max \|logit difference\| 0\.001"
    ):
        export_onnx(odd, out, check_inputs=2)
    assert out.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_bad_arguments_get_one_clear_message(bundle_dir: Path, tmp_path: Path) -> None:
    bundle = load_bundle(bundle_dir)
    with pytest.raises(ValueError, match="check_inputs must be >= 1"):
        export_onnx(bundle, tmp_path / "a.onnx", check_inputs=0)
    with pytest.raises(ValueError, match="is a folder"):
        export_onnx(bundle, tmp_path)
    code, stdout, stderr = _cli(
        "export", "--model", str(tmp_path / "nothing"), "--onnx", str(tmp_path / "b.onnx")
    )
    assert code == 2 and stdout == ""
    assert stderr.strip().count("\n") == 0 and "nothing: no such folder" in stderr
    assert not (tmp_path / "b.onnx").exists()
