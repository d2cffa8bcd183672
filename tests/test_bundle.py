"""The model/ bundle: export a tiny timm ViT, reload it with no training code, get the same logits; the
preprocessing is the training pipeline's own; broken bundles fail with one clear message."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from xraycls.data.images import load_xray
from xraycls.data.transforms import DeviceNormalize, build_eval_transform
from xraycls.findings import LABELS, NUM_LABELS
from xraycls.inference.bundle import (
    BUNDLE_CONFIG,
    BUNDLE_FORMAT_VERSION,
    BUNDLE_WEIGHTS,
    export_bundle,
    load_bundle,
    make_preprocessing,
)
from xraycls.model.backbone import create_backbone

# Not the default 0.5/0.5 and a cache size other than the input size: a loader ignoring either would fail.
PREP = make_preprocessing(image_size=80, input_size=64, mean=0.45, std=0.3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def kwargs(tiny_backbone_kwargs: dict) -> dict:
    """The bundle's backbone_kwargs: the tiny model (conf/model/vit_tiny.yaml) with a 15-way head."""
    return {"num_classes": NUM_LABELS, **tiny_backbone_kwargs, "drop_path_rate": 0.0}


@pytest.fixture(scope="module")
def build_backbone(tiny_backbone: str, kwargs: dict) -> Callable[..., torch.nn.Module]:
    def build(seed: int = 0) -> torch.nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = create_backbone(tiny_backbone, weights="none", **kwargs)
            # A wider head than timm's small init: clearly non-zero logits make the comparisons meaningful.
            torch.nn.init.normal_(model.head.weight, std=0.5)
        return model.eval()

    return build


@pytest.fixture(scope="module")
def export_tiny(tiny_backbone: str, kwargs: dict) -> Callable[..., Path]:
    def export(model: torch.nn.Module, out: Path, **extra: object) -> Path:
        return export_bundle(
            model, out, backbone_name=tiny_backbone, backbone_kwargs=kwargs, preprocessing=PREP, **extra
        )

    return export


def _xray_files(folder: Path, count: int = 3) -> list[Path]:
    """Real PNG files of other sizes than the cache (non-square too), decoded by load_xray."""
    rng = np.random.default_rng(5)
    paths = []
    for i, shape in enumerate([(120, 100), (200, 200), (60, 90)][:count]):
        path = folder / f"x{i}.png"
        assert cv2.imwrite(str(path), rng.integers(0, 256, shape, dtype=np.uint8))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def bundle_dir(
    tmp_path_factory: pytest.TempPathFactory,
    build_backbone: Callable[..., torch.nn.Module],
    export_tiny: Callable[..., Path],
) -> Path:
    metrics = {
        "test": {"split": "official", "auroc_macro14": 0.81, "auroc_per_finding": {"Hernia": float("nan")}}
    }
    return export_tiny(
        build_backbone(), tmp_path_factory.mktemp("run") / "model", metrics=metrics, extra={"thr": [0.5]}
    )


def test_bundle_holds_weights_and_config_only(bundle_dir: Path, kwargs: dict, tiny_backbone: str) -> None:
    assert sorted(p.name for p in bundle_dir.iterdir()) == [BUNDLE_CONFIG, BUNDLE_WEIGHTS]  # no pickle
    assert sorted(p.name for p in bundle_dir.parent.iterdir()) == ["model"]  # no temporary folder left
    config = json.loads((bundle_dir / BUNDLE_CONFIG).read_text())
    assert config["format_version"] == BUNDLE_FORMAT_VERSION
    assert config["backbone"] == tiny_backbone
    assert config["backbone_kwargs"] == kwargs
    assert config["labels"] == list(LABELS)
    assert config["preprocessing"] == PREP
    assert config["metrics"]["test"] == {
        "split": "official",
        "auroc_macro14": 0.81,
        "auroc_per_finding": {"Hernia": None},  # NaN is not JSON
    }
    assert config["extra"] == {"thr": [0.5]}
    assert config["xraycls_version"]


def test_every_file_of_the_bundle_gets_the_umasks_mode(
    build_backbone: Callable[..., torch.nn.Module], export_tiny: Callable[..., Path], tmp_path: Path
) -> None:
    """safetensors makes its file 0600 whatever the umask; the bundle's weights get config.json's mode."""
    old = os.umask(0o027)  # a group-readable umask, so 0600 and the umask's 0640 differ in the group bit
    try:
        bundle = export_tiny(build_backbone(), tmp_path / "model")
    finally:
        os.umask(old)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in bundle.iterdir()}
    assert modes == {BUNDLE_CONFIG: 0o640, BUNDLE_WEIGHTS: 0o640}


def test_reloaded_model_gives_identical_logits(
    bundle_dir: Path, build_backbone: Callable[..., torch.nn.Module]
) -> None:
    original = build_backbone()
    bundle = load_bundle(bundle_dir)
    assert not bundle.model.training
    assert bundle.labels == list(LABELS) and bundle.preprocessing == PREP
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = original(x)
        assert expected.abs().max() > 0.1  # not a trivial all-zero output
        assert torch.equal(bundle.model(x), expected)
        assert not torch.equal(build_backbone(seed=1)(x), expected)  # another init would not pass


def test_preprocess_is_the_training_pipeline(bundle_dir: Path, tmp_path: Path) -> None:
    bundle = load_bundle(bundle_dir)
    images = [load_xray(path, 80) for path in _xray_files(tmp_path)]
    resize = build_eval_transform(64)
    by_hand = DeviceNormalize(0.45, 0.3)(
        torch.from_numpy(np.stack([resize(image=im)["image"] for im in images]))
    )
    got = bundle.preprocess(images)
    assert got.shape == (3, 3, 64, 64) and got.dtype == torch.float32
    assert torch.equal(got, by_hand)


def test_predict_proba_is_the_sigmoid_of_the_model(bundle_dir: Path, tmp_path: Path) -> None:
    bundle = load_bundle(bundle_dir)
    images = [load_xray(path, 80) for path in _xray_files(tmp_path)]
    with torch.no_grad():
        expected = torch.sigmoid(bundle.model(bundle.preprocess(images))).numpy()
    probs = bundle.predict_proba(images)
    assert probs.shape == (3, NUM_LABELS) and probs.dtype == np.float32
    np.testing.assert_array_equal(probs, expected)
    np.testing.assert_allclose(bundle.predict_proba(images, batch_size=2), expected, atol=1e-6)
    assert bundle.predict_proba([]).shape == (0, NUM_LABELS)
    # The model still trains/explains after inference (its parameters are not inference tensors).
    bundle.model(bundle.preprocess(images)).sum().backward()
    assert bundle.model.head.weight.grad is not None


def test_preprocess_rejects_images_not_at_the_cache_size(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    with pytest.raises(
        ValueError,
        match=r"image 1: expected uint8 \[80, 80\] \(load_xray\(path, 80\)\), got uint8 \[64, 64\]",
    ):
        bundle.preprocess([np.zeros((80, 80), np.uint8), np.zeros((64, 64), np.uint8)])
    with pytest.raises(ValueError, match="got float32"):
        bundle.preprocess([np.zeros((80, 80), np.float32)])
    images = [np.zeros((80, 80), np.uint8)] * 3 + [np.zeros((80, 80, 3), np.uint8)]
    with pytest.raises(ValueError, match=r"image 3: expected uint8 \[80, 80\].*got uint8 \[80, 80, 3\]"):
        bundle.predict_proba(images, batch_size=2)


def test_tied_and_non_contiguous_parameters_export(
    tmp_path: Path, build_backbone: Callable[..., torch.nn.Module], export_tiny: Callable[..., Path]
) -> None:
    model = build_backbone()
    model.blocks[1].norm1.weight = model.blocks[0].norm1.weight  # two names, one storage
    with torch.no_grad():
        model.blocks[0].norm1.weight.mul_(1.5)
    proj = model.blocks[0].attn.proj
    proj.weight = torch.nn.Parameter(proj.weight.detach().t().contiguous().t())  # a transposed view
    assert not proj.weight.is_contiguous()
    bundle = load_bundle(export_tiny(model, tmp_path / "model"))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(bundle.model(x), model(x))


def test_a_torch_compiled_backbone_exports_its_plain_keys(
    tmp_path: Path, build_backbone: Callable[..., torch.nn.Module], export_tiny: Callable[..., Path]
) -> None:
    model = build_backbone()
    compiled = torch.compile(model, backend="eager")  # an OptimizedModule: keys prefixed "_orig_mod."
    bundle = load_bundle(export_tiny(compiled, tmp_path / "model"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(bundle.model(x), model(x))


def test_reexport_replaces_a_bundle_but_never_other_folders(
    bundle_dir: Path,
    tmp_path: Path,
    build_backbone: Callable[..., torch.nn.Module],
    export_tiny: Callable[..., Path],
) -> None:
    out = export_tiny(build_backbone(seed=0), tmp_path / "model")
    export_tiny(build_backbone(seed=3), out, metrics={"val": {"auroc_macro14": 0.5}})
    assert json.loads((out / BUNDLE_CONFIG).read_text())["metrics"] == {"val": {"auroc_macro14": 0.5}}
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(load_bundle(out).model(x), build_backbone(seed=3)(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"notes: it exists and is not a model bundle"):
        export_tiny(build_backbone(), precious)
    assert [p.name for p in precious.iterdir()] == ["keep.txt"]


def test_export_checks_its_arguments(
    tmp_path: Path, build_backbone: Callable[..., torch.nn.Module], kwargs: dict, tiny_backbone: str
) -> None:
    model = build_backbone()
    without_std = {k: v for k, v in PREP.items() if k != "std"}
    for backbone_kwargs, preprocessing, message in (
        ({**kwargs, "img_size": 32}, PREP, r"do not rebuild the exported 'test_vit'.*pos_embed"),
        ({**kwargs, "num_classes": 14}, PREP, r"num_classes must be 15"),
        (kwargs, without_std, r"preprocessing lacks \['std'\]"),
    ):
        with pytest.raises(ValueError, match=message):
            export_bundle(
                model,
                tmp_path / "a",
                backbone_name=tiny_backbone,
                backbone_kwargs=backbone_kwargs,
                preprocessing=preprocessing,
            )
    assert not (tmp_path / "a").exists()


def _broken_copy(bundle_dir: Path, tmp_path: Path, **changes: object) -> Path:
    """A copy of the bundle with config.json keys changed: None deletes, a mapping updates the stored one."""
    copy = tmp_path / "broken"
    copy.mkdir()
    (copy / BUNDLE_WEIGHTS).write_bytes((bundle_dir / BUNDLE_WEIGHTS).read_bytes())
    config = json.loads((bundle_dir / BUNDLE_CONFIG).read_text())
    for key, value in changes.items():
        if value is None:
            del config[key]
        elif isinstance(value, dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    (copy / BUNDLE_CONFIG).write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"labels": [*LABELS[:-2], LABELS[-1], LABELS[-2]]},
            r"broken: labels \[.*\] do not match xraycls LABELS",
        ),
        ({"format_version": 99}, r"broken: unknown format 'xraycls-model' version 99"),
        (
            {"backbone": None, "preprocessing": None},
            r"broken: config.json lacks \['backbone', 'preprocessing'\]",
        ),
        (
            {"backbone_kwargs": {"patch_size": 8}},
            r"broken: model.safetensors does not fit backbone",
        ),
        (
            {"backbone_kwargs": {"num_classes": 14}},
            r"broken: backbone_kwargs must be .* num_classes=15",
        ),
        ({"backbone": "no_such_net"}, r"broken: model.backbone='no_such_net' is not a timm model"),
        (
            {"preprocessing": {**PREP, "image_size": 0}},
            r"broken: preprocessing.image_size must be a positive int",
        ),
    ],
)
def test_bad_config_is_one_clear_error(
    bundle_dir: Path, tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        load_bundle(_broken_copy(bundle_dir, tmp_path, **changes))


def test_missing_or_corrupt_files_are_named(bundle_dir: Path, tmp_path: Path) -> None:
    broken = _broken_copy(bundle_dir, tmp_path)
    (broken / BUNDLE_WEIGHTS).write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match=r"broken: model.safetensors is not a readable safetensors file"):
        load_bundle(broken)
    (broken / BUNDLE_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=r"broken: model.safetensors is missing"):
        load_bundle(broken)
    (broken / BUNDLE_CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match=r"broken: config.json is not valid JSON"):
        load_bundle(broken)
    (broken / BUNDLE_CONFIG).unlink()
    with pytest.raises(FileNotFoundError, match=r"broken: config.json is missing"):
        load_bundle(broken)
    with pytest.raises(FileNotFoundError, match=r"nowhere: no such folder"):
        load_bundle(tmp_path / "nowhere")
