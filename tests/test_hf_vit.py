"""transformers ViT <-> timm: weights to fine-tune, the guide's classifier imported as a bundle and back.

Real transformers models, randomly initialised (seeded) at a small size: 64 wide, 2 layers, 4 heads, MLP 128,
32 px images in 8 px patches. Tolerances: the renaming is exact (0 difference once both use the same layer
norm eps); with timm's eps 1e-6 against transformers' 1e-12, features differ by < 1e-4 when the embeddings
have a trained ViT's scale (unit variance; seen 7e-7) and by < 5e-3 on a fresh transformers init, whose
CLS token is ~N(0, 0.02^2) (seen 1.2e-3 on features of size ~3). See `xraycls.model.hf_vit`.
"""

from __future__ import annotations

import functools
import json
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from xraycls.findings import LABELS  # noqa: E402
from xraycls.inference.bundle import export_bundle, load_bundle, make_preprocessing  # noqa: E402
from xraycls.inference.hf_bundle import export_hf, import_hf  # noqa: E402
from xraycls.model.backbone import create_backbone  # noqa: E402

GUIDE_LABELS = sorted(LABELS)  # the guide's id2label: alphabetical, "No Finding" between Nodule and Mass
SIZE, PATCH = 32, 8
TIMM_NAME = "vit_base_patch16_224"
TIMM_KWARGS = {
    "embed_dim": 64,
    "depth": 2,
    "num_heads": 4,
    "mlp_ratio": 2.0,
    "img_size": SIZE,
    "patch_size": PATCH,
}


def _config(**extra: object) -> transformers.ViTConfig:
    return transformers.ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=SIZE,
        patch_size=PATCH,
        **extra,
    )


def _seeded(cls: type, config: transformers.ViTConfig, seed: int, unit_embeddings: bool) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(config).eval()
        if unit_embeddings:  # a trained ViT's scale; a fresh init leaves the CLS token near zero
            embeddings = (model.vit if hasattr(model, "vit") else model).embeddings
            with torch.no_grad():
                embeddings.cls_token.normal_()
                embeddings.position_embeddings.normal_()
    return model


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).normal(size=(3, 3, SIZE, SIZE)).astype(np.float32))


@pytest.fixture(scope="module")
def guide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ViTForImageClassification folder like the guide's: alphabetical labels, processor, trainer state."""
    config = _config(
        id2label=dict(enumerate(GUIDE_LABELS)),
        label2id={name: i for i, name in enumerate(GUIDE_LABELS)},
        problem_type="multi_label_classification",
    )
    model = _seeded(transformers.ViTForImageClassification, config, seed=1, unit_embeddings=True)
    with torch.no_grad():  # a non-trivial head: logits of several units, one bias per label
        model.classifier.weight.normal_(0, 0.5)
        model.classifier.bias.copy_(torch.linspace(-2, 2, len(GUIDE_LABELS)))
    folder = tmp_path_factory.mktemp("guide")
    model.save_pretrained(folder)
    size = {"height": SIZE, "width": SIZE}
    transformers.ViTImageProcessor(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        folder
    )
    history = [{"epoch": 3.0, "eval_loss": 0.1875, "eval_roc_auc": 0.7681, "step": 900}]
    history.append({"epoch": 3.0, "step": 900, "train_runtime": 1234.5, "train_loss": 0.19})
    state = {"global_step": 900, "epoch": 3.0, "log_history": history}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    return folder


@pytest.fixture(scope="module")
def imported(guide_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return import_hf(guide_dir, tmp_path_factory.mktemp("run") / "model")


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.mark.parametrize(("unit_embeddings", "atol"), [(True, 1e-4), (False, 5e-3)])
@pytest.mark.parametrize("form", ["folder", "safetensors file", "bin folder", "bare file"])
def test_weights_give_transformers_features(
    tmp_path: Path, inputs: torch.Tensor, form: str, unit_embeddings: bool, atol: float
) -> None:
    hf = _seeded(transformers.ViTModel, _config(), seed=0, unit_embeddings=unit_embeddings)
    hf.save_pretrained(tmp_path / "vit")
    weights = tmp_path / "vit"
    if form == "bin folder":  # transformers 4.x's pytorch_model.bin: a plain dict of tensors
        state = safetensors.torch.load_file(str(weights / "model.safetensors"))
        torch.save(state, weights / "pytorch_model.bin")
        (weights / "model.safetensors").unlink()
    elif form == "safetensors file":
        weights = weights / "model.safetensors"
    elif form == "bare file":  # no config.json beside it: the shapes are read from the tensors
        weights = shutil.copy(weights / "model.safetensors", tmp_path / "vit_model.safetensors")
    with torch.no_grad():
        expected = hf(pixel_values=inputs).last_hidden_state[:, 0]  # CLS after the final layer norm
        timm_model = create_backbone(TIMM_NAME, weights=weights, **TIMM_KWARGS).eval()
        same_eps = create_backbone(
            TIMM_NAME, weights=weights, norm_layer=functools.partial(nn.LayerNorm, eps=1e-12), **TIMM_KWARGS
        ).eval()
        torch.testing.assert_close(_features(same_eps, inputs), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(_features(timm_model, inputs), expected, rtol=0, atol=atol)
    assert timm_model.head.out_features == len(LABELS)


def test_mismatched_architecture_is_refused(guide_dir: Path) -> None:
    kwargs = {**TIMM_KWARGS, "depth": 3, "img_size": 64}
    with pytest.raises(ValueError, match=r"does not match backbone .*depth 2 vs 3, image_size 32 vs 64"):
        create_backbone(TIMM_NAME, weights=guide_dir, **kwargs)
    with pytest.raises(ValueError, match=r"heads 4 vs 2"):
        create_backbone(TIMM_NAME, weights=guide_dir, **{**TIMM_KWARGS, "num_heads": 2})


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_pickled_object_in_bin_is_refused_unrun(guide_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(guide_dir / "config.json", folder / "config.json")
    state: dict[str, object] = dict(safetensors.torch.load_file(str(guide_dir / "model.safetensors")))
    marker = tmp_path / "ran"
    state["payload"] = _RunsCode(marker)
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="will not be unpickled"):
        create_backbone(TIMM_NAME, weights=folder, **TIMM_KWARGS)
    with pytest.raises(ValueError, match="will not be unpickled"):
        import_hf(folder, tmp_path / "model")
    assert not marker.exists()


def test_imported_bundle_gives_transformers_probabilities(guide_dir: Path, imported: Path) -> None:
    bundle = load_bundle(imported)
    assert bundle.labels == list(LABELS)
    assert bundle.config["backbone"] == TIMM_NAME and bundle.config["backbone_kwargs"]["depth"] == 2
    assert bundle.preprocessing["input_size"] == SIZE and bundle.preprocessing["mean"] == [0.5] * 3
    provenance = bundle.config["extra"]["provenance"]
    assert provenance["architectures"] == ["ViTForImageClassification"]
    assert provenance["source_labels"] == GUIDE_LABELS
    assert provenance["trainer_state"]["train_runtime_s"] == 1234.5
    assert provenance["trainer_state"]["log_history_last"][0]["eval_roc_auc"] == 0.7681

    images = np.random.default_rng(2).integers(0, 256, size=(4, SIZE, SIZE), dtype=np.uint8)
    ours = bundle.predict_proba(list(images))
    hf = transformers.ViTForImageClassification.from_pretrained(guide_dir).eval()
    processor = transformers.ViTImageProcessor.from_pretrained(guide_dir)
    rgb = [np.repeat(image[:, :, None], 3, axis=2) for image in images]  # the guide's gray -> RGB
    with torch.no_grad():
        theirs = torch.sigmoid(hf(**processor(rgb, return_tensors="pt")).logits).numpy()
    assert ours.min() < 0.3 and ours.max() > 0.7  # the head spreads the probabilities
    for name in LABELS:  # by label name: the guide's alphabetical order is not ours
        ours_col, theirs_col = ours[:, LABELS.index(name)], theirs[:, hf.config.label2id[name]]
        np.testing.assert_allclose(ours_col, theirs_col, rtol=0, atol=1e-5, err_msg=name)


def test_predict_runs_on_the_imported_bundle(imported: Path, tmp_path: Path) -> None:
    from xraycls.inference.predict_run import run_predict

    images = np.random.default_rng(3).integers(0, 256, size=(2, SIZE, SIZE), dtype=np.uint8)
    for i, image in enumerate(images):
        cv2.imwrite(str(tmp_path / f"x{i}.png"), image)
    predictions = run_predict(imported, [tmp_path], out=tmp_path / "p.csv", device="cpu", progress=False)
    expected = load_bundle(imported).predict_proba(list(images))
    np.testing.assert_allclose(np.asarray(predictions.probabilities), expected, rtol=0, atol=1e-6)


def _relabelled(guide_dir: Path, tmp_path: Path, labels: list[str]) -> Path:
    folder = shutil.copytree(guide_dir, tmp_path / "relabelled")
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {str(i): name for i, name in enumerate(labels)}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_missing_or_extra_labels_are_refused(guide_dir: Path, tmp_path: Path) -> None:
    labels = [name if name != "Pneumothorax" else "COVID-19" for name in GUIDE_LABELS]
    with pytest.raises(ValueError, match=r"missing \['Pneumothorax'\], extra or repeated \['COVID-19'\]"):
        import_hf(_relabelled(guide_dir, tmp_path, labels), tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_export_reproduces_the_bundle_in_transformers(imported: Path, tmp_path: Path) -> None:
    out = export_hf(imported, tmp_path / "hf")
    hf = transformers.ViTForImageClassification.from_pretrained(out).eval()
    assert [hf.config.id2label[i] for i in range(len(LABELS))] == list(LABELS)
    assert hf.config.problem_type == "multi_label_classification"
    assert (hf.config.image_size, hf.config.patch_size, hf.config.hidden_size) == (SIZE, PATCH, 64)
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": SIZE, "width": SIZE} and processor["image_mean"] == [0.5] * 3
    modes = {path.name: path.stat().st_mode & 0o777 for path in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # the weights too, not safetensors' own 0600
    bundle = load_bundle(imported)
    images = np.random.default_rng(4).integers(0, 256, size=(3, SIZE, SIZE), dtype=np.uint8)
    x = bundle.preprocess(list(images))
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, bundle.model(x), rtol=0, atol=1e-5)
    # and back again: the same model once more
    again = load_bundle(import_hf(out, tmp_path / "again"))
    np.testing.assert_allclose(
        again.predict_proba(list(images)), bundle.predict_proba(list(images)), atol=1e-6
    )


def test_export_refuses_what_transformers_vit_cannot_express(tmp_path: Path) -> None:
    kwargs = {**TIMM_KWARGS, "num_classes": len(LABELS), "global_pool": "avg", "fc_norm": False}
    model = create_backbone(TIMM_NAME, weights="none", **kwargs)
    folder = export_bundle(
        model,
        tmp_path / "model",
        backbone_name=TIMM_NAME,
        backbone_kwargs=kwargs,
        preprocessing=make_preprocessing(SIZE, SIZE),
    )
    with pytest.raises(ValueError, match=r"cannot be written as a transformers ViT: global_pool 'avg'"):
        export_hf(folder, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_without_transformers_names_the_extra(imported: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(RuntimeError, match=r"pip install -e \.\[hf\]"):
        export_hf(imported, tmp_path / "hf")


def test_timm_backbone_for_the_guide_shape() -> None:
    from xraycls.inference.hf_bundle import _timm_backbone
    from xraycls.model.hf_vit import VitArch

    base = VitArch(
        patch_size=16, hidden_size=768, depth=12, heads=12, mlp_size=3072, image_size=224, qkv_bias=True
    )
    assert _timm_backbone(base) == (TIMM_NAME, {"num_classes": len(LABELS)})  # google/vit-base-patch16-224*
    assert _timm_backbone(VitArch(16, 768, 12, 12, 3072, 384, True))[0] == "vit_base_patch16_384"
    small = VitArch(PATCH, 64, 2, 4, 128, SIZE, False)
    expected = {**TIMM_KWARGS, "num_classes": len(LABELS), "qkv_bias": False}
    assert _timm_backbone(small) == (TIMM_NAME, expected)
