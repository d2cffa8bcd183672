"""`xraycls evaluate`: the metrics.json layout, the training preprocessing path, bad inputs stopped before
any prediction, and stored temperatures applied by predict and evaluate without changing a flag; on the
demo run (slow), evaluate reproduces the run's test metrics and its summary carries the same intervals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from xraycls.data.cache import open_cache, prepare_cache
from xraycls.data.synthetic import make_synthetic_nih
from xraycls.evaluation import evaluate as evaluate_module
from xraycls.evaluation.data import check_labels
from xraycls.evaluation.evaluate import run_evaluate
from xraycls.evaluation.predictions import read_scored_images
from xraycls.findings import FINDINGS, LABELS
from xraycls.inference.bundle import export_bundle, load_bundle, make_preprocessing
from xraycls.inference.predict_run import run_predict
from xraycls.inference.thresholds import choose_thresholds
from xraycls.model.backbone import create_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 32  # cached side = model input: a tiny random ViT is enough to test the wiring
SUMMARY_KEYS = ("loss", "auroc_macro14", "auroc_macro15", "auroc_seed_compat", "auroc_per_finding")


def _bundle(folder: Path, *, seed: int = 0, image_size: int = SIZE, extra: dict | None = None) -> Path:
    torch.manual_seed(seed)
    kwargs = {"num_classes": len(LABELS), "img_size": SIZE, "patch_size": 8}
    backbone = create_backbone("test_vit", weights="none", **kwargs)
    return export_bundle(
        backbone, folder, backbone_name="test_vit", backbone_kwargs=kwargs,
        preprocessing=make_preprocessing(image_size, SIZE), extra=extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A synthetic NIH folder (80 images), its 32 px cache, and two random tiny bundles (seeds 0 and 1)."""
    base = tmp_path_factory.mktemp("evaluate")
    make_synthetic_nih(base / "raw", 80, size=64, seed=0, min_prevalence=0.1)
    prepare_cache(base / "raw", base / "cache", size=SIZE, workers=1, progress=False)
    return {
        "base": base,
        "raw": base / "raw",
        "cache": base / "cache",
        "model": _bundle(base / "model"),
        "model_b": _bundle(base / "model_b", seed=1),
    }


def test_metrics_json_has_the_summary_layout_and_the_training_preprocessing(
    small: dict, tmp_path: Path
) -> None:
    result = run_evaluate(small["model"], tmp_path / "ev", cache_dir=small["cache"], bootstrap=50,
                          device="cpu", progress=False)  # fmt: skip
    written = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert written["split"] == "official" and written["part"] == "test"
    assert set(SUMMARY_KEYS) <= set(written) and set(written["auroc_per_finding"]) == set(LABELS)
    assert written["ci"]["resamples"] == 50 and written["ci"]["unit"] == "patient"
    assert set(written["average_precision_per_finding"]) == set(LABELS)
    points = written["operating_points"]["per_finding"]
    assert set(points) == set(FINDINGS) and all(p["threshold"] == 0.5 for p in points.values())
    assert (
        written["calibration"]["ece_calibrated"] is None and "equal-width" in written["calibration"]["rule"]
    )
    for name in ("roc.png", "pr.png", "reliability.png"):
        assert (tmp_path / "ev" / name).read_bytes()[:4] == b"\x89PNG"
    scored = read_scored_images(tmp_path / "ev" / "predictions.csv")
    assert len(scored.images) == written["images"] == result["images"] > 0
    assert written["patients"] == len(set(scored.patients.tolist()))
    # Same preprocessing as the bundle's own path (ModelBundle.predict_proba on the cached images).
    array, index = open_cache(small["cache"], SIZE)
    rows = index.index[index["image"].isin(scored.images)].to_numpy()
    order = {name: k for k, name in enumerate(index["image"].to_numpy()[rows])}
    images = [np.array(array[rows[order[name]]]) for name in scored.images]
    direct = load_bundle(small["model"]).predict_proba(images, batch_size=7)
    np.testing.assert_allclose(scored.probabilities, direct, atol=2e-6)


def _no_prediction(*_args, **_kwargs):
    raise AssertionError("a prediction ran before the bad input was reported")


def test_bad_inputs_stop_before_any_prediction(
    small: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(evaluate_module, "predict_logits", _no_prediction)
    out = tmp_path / "ev"
    wrong_size = _bundle(tmp_path / "m48", image_size=48)
    with pytest.raises(ValueError, match=r"holds 32px images, but the model was trained on 48px"):
        run_evaluate(wrong_size, out, cache_dir=small["cache"], device="cpu")
    with pytest.raises(ValueError, match="split 'patient_random' cannot be built"):
        run_evaluate(small["model"], out, cache_dir=small["cache"], split="patient_random",
                     val_fraction=0.6, test_fraction=0.5, device="cpu")  # fmt: skip
    with pytest.raises(ValueError, match="--part 'holdout'"):
        run_evaluate(small["model"], out, cache_dir=small["cache"], part="holdout", device="cpu")
    with pytest.raises(ValueError, match="stores no temperatures"):
        run_evaluate(small["model"], out, cache_dir=small["cache"], calibrated=True, device="cpu")
    # An empty part: every test image moved to the train_val list.
    raw = tmp_path / "raw"
    shutil.copytree(small["raw"], raw)
    test = (raw / "test_list.txt").read_text()
    (raw / "train_val_list.txt").write_text((raw / "train_val_list.txt").read_text() + "\n" + test)
    (raw / "test_list.txt").write_text("")
    with pytest.raises(ValueError, match="part 'test' of split 'official' .* holds no images"):
        run_evaluate(small["model"], out, root=raw, device="cpu")
    with pytest.raises(ValueError, match="labels .* do not match"):
        check_labels(["Atelectasis", "Cardiomegaly"], list(LABELS), "cache x")
    assert not out.exists()


def test_temperatures_in_the_bundle_change_probabilities_not_flags(small: dict, tmp_path: Path) -> None:
    plain = run_evaluate(small["model"], tmp_path / "val", cache_dir=small["cache"], part="val",
                         bootstrap=0, device="cpu", progress=False)  # fmt: skip
    val = read_scored_images(tmp_path / "val" / "predictions.csv")
    thresholds = choose_thresholds(val.probabilities, val.labels)
    temperatures = {name: (0.25 if k % 2 else 3.0) for k, name in enumerate(LABELS)}
    calibration = {"method": "temperature", "temperatures": temperatures, "fitted_on": {"stage": "val"}}
    extra = {"thresholds": thresholds, "calibration": calibration}
    model = _bundle(tmp_path / "calibrated_model", extra=extra)
    assert plain["ci"] is None
    before = run_evaluate(model, tmp_path / "b", cache_dir=small["cache"], bootstrap=0, device="cpu",
                          progress=False)  # fmt: skip
    after = run_evaluate(model, tmp_path / "a", cache_dir=small["cache"], bootstrap=0, device="cpu",
                         calibrated=True, progress=False)  # fmt: skip
    assert after["calibrated_probabilities"] and after["calibration"]["ece_calibrated"] is not None
    assert after["auroc_macro14"] == before["auroc_macro14"]  # a monotone map keeps every ranking
    for name in FINDINGS:
        pb, pa = (
            before["operating_points"]["per_finding"][name],
            after["operating_points"]["per_finding"][name],
        )
        assert {k: pb[k] for k in ("flagged", "sensitivity", "specificity")} == {
            k: pa[k] for k in ("flagged", "sensitivity", "specificity")
        }
    flagged_any = sum(p["flagged"] for p in before["operating_points"]["per_finding"].values())
    assert flagged_any > 0
    probs_b = read_scored_images(tmp_path / "b" / "predictions.csv").probabilities
    probs_a = read_scored_images(tmp_path / "a" / "predictions.csv").probabilities
    assert np.abs(probs_a - probs_b).max() > 0.01
    # predict: the same files, with and without --calibrated.
    files = sorted((small["raw"] / "images").glob("*.png"))[:40]
    raw = run_predict(model, files, device="cpu", progress=False)
    cal = run_predict(model, files, device="cpu", progress=False, calibrated=True)
    assert raw.flagged == cal.flagged and any(raw.flagged)
    assert np.abs(raw.probabilities - cal.probabilities).max() > 0.01
    assert "mapped through the temperatures" in cal.thresholds.method
    with pytest.raises(ValueError, match="stores no temperatures"):
        run_predict(small["model"], files, device="cpu", calibrated=True)


@pytest.mark.slow
def test_evaluate_reproduces_the_demo_runs_test_metrics(
    demo_run: tuple[Path, dict, float], data_dir: Path, tmp_path: Path
) -> None:
    """Tolerance: 1e-6 absolute on every AUROC (torchmetrics computes in float32, evaluate exactly) and
    1e-6 relative on the loss; everything else (images, split) equal."""
    run_dir, summary, _seconds = demo_run
    test = summary["metrics"]["test"]
    result = run_evaluate(run_dir / "model", tmp_path / "ev", cache_dir=data_dir / "demo" / "cache",
                          part="test", bootstrap=2000, seed=0, device="cpu", progress=False)  # fmt: skip
    assert result["split"] == test["split"] and result["images"] == summary["data"]["images"]["test"]
    for key in ("auroc_macro14", "auroc_macro15", "auroc_seed_compat"):
        assert result[key] == pytest.approx(test[key], abs=1e-6), key
    for name in LABELS:
        assert result["auroc_per_finding"][name] == pytest.approx(test["auroc_per_finding"][name], abs=1e-6)
    assert result["loss"] == pytest.approx(test["loss"], rel=1e-6)
    # The run's summary carries the ci block, from the same resamples (its probabilities, not logits).
    ci = test["ci"]
    assert ci["resamples"] == 2000 and ci["unit"] == "patient"
    for key in ("auroc_macro14", "auroc_seed_compat"):
        np.testing.assert_allclose(ci[key], result["ci"][key], atol=1e-6)
    scored = read_scored_images(run_dir / "predictions_test.csv")
    ours = read_scored_images(tmp_path / "ev" / "predictions.csv")
    assert list(scored.images) == list(ours.images)
    np.testing.assert_allclose(scored.probabilities, ours.probabilities, atol=1e-6)
    assert (run_dir / "model" / "config.json").is_file()
    extra = json.loads((run_dir / "model" / "config.json").read_text())["extra"]
    assert extra["data"]["split"] == "official" and "pos_weight" in extra["loss"]


def test_the_split_is_rebuilt_with_the_runs_row_order() -> None:
    """seed_reproduction permutes the images in file-name order: evaluate must rebuild that same split."""
    from xraycls.evaluation.data import split_settings

    data = {"split": "seed_random", "split_seed": 1337, "split_row_order": "file_name"}
    trained = {"extra": {"data": data}}
    own = split_settings(trained)
    assert (own.name, own.seed, own.row_order) == ("seed_random", 1337, "file_name")
    other = split_settings(trained, split="official")
    assert (other.name, other.row_order) == ("official", "label_file")
