"""`xraycls predict` end to end with a model trained by the demo recipe: the genuine NIH samples (RGBA ones
included), DICOM files, the stored thresholds, CSV/JSON/grid outputs with the disclaimer, bad input and exit
codes."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from _project import NIH_SHARED, compose_cfg, demo_overrides
from test_readers import write_dicom

from xraycls.cli import main
from xraycls.data.images import load_xray
from xraycls.data.labels import read_label_file
from xraycls.data.synthetic import make_synthetic_nih
from xraycls.disclaimer import DISCLAIMER
from xraycls.findings import FINDINGS, LABELS
from xraycls.inference.bundle import BUNDLE_CONFIG, load_bundle
from xraycls.inference.outputs import prediction_grid_figure
from xraycls.inference.predict import load_thresholds, predict_files, resolve_device
from xraycls.inference.predict_run import run_predict
from xraycls.training import run_training

CSV_COLUMNS = ["path", "image", *LABELS, "flagged"]


# Every test here uses the model the `demo` fixture trains.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model dir, synthetic raw dir): one short run of the demo recipe, on a smaller synthetic set."""
    data = tmp_path_factory.mktemp("data")
    make_synthetic_nih(data / "demo" / "raw", 160, size=64, seed=3, min_prevalence=0.1)
    run_dir = tmp_path_factory.mktemp("run")
    overrides = demo_overrides(data, "trainer.max_epochs=2", "plots=false")
    summary = run_training(compose_cfg(overrides, run_dir))
    return Path(summary["model_dir"]), data / "demo" / "raw"


def _with_thresholds(model_dir: Path, out: Path, thresholds: dict | None) -> Path:
    """A copy of the bundle whose config stores `thresholds` as extra.thresholds (None: none stored)."""
    shutil.copytree(model_dir, out)
    config = json.loads((out / BUNDLE_CONFIG).read_text())
    config.setdefault("extra", {}).pop("thresholds", None)
    if thresholds is not None:
        config["extra"]["thresholds"] = thresholds
    (out / BUNDLE_CONFIG).write_text(json.dumps(config))
    return out


def _read_csv(path: Path) -> tuple[str, pd.DataFrame]:
    first = path.read_text().splitlines()[0]
    table = pd.read_csv(path, skiprows=1, keep_default_na=False)
    return first, table


def _images(raw: Path, count: int) -> list[Path]:
    return sorted((raw / "images").glob("*.png"))[:count]


def _expected_probs(model_dir: Path, paths: list[Path]) -> np.ndarray:
    bundle = load_bundle(model_dir)
    size = bundle.preprocessing["image_size"]
    return bundle.predict_proba([load_xray(path, size) for path in paths])


@pytest.mark.real_nih
def test_predicts_every_genuine_sample_including_rgba(
    demo: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir, _raw = demo
    sample = NIH_SHARED / "sample"
    out = tmp_path / "preds.csv"
    code = main(["predict", "--model", str(model_dir), str(sample), "--out", str(out), "--quiet"])
    assert code == 0
    first, table = _read_csv(out)
    assert first.startswith("# ") and DISCLAIMER in first
    assert list(table.columns) == CSV_COLUMNS
    paths = sorted(sample.glob("*.png"))
    assert table["path"].tolist() == [str(path) for path in paths]
    manifest = pd.read_csv(NIH_SHARED / "sample_manifest.csv")
    rgba = set(manifest.loc[manifest["mode"] == "RGBA", "Image Index"])
    assert len(rgba) == 3 and rgba <= set(table["image"])
    # The probabilities are the bundle's on the training decode rule: nothing re-implemented on the way.
    expected = _expected_probs(model_dir, paths)
    np.testing.assert_allclose(table[list(LABELS)].to_numpy(), expected, atol=2e-6)
    assert DISCLAIMER in capsys.readouterr().out


@pytest.mark.real_nih
def test_grid_titles_show_real_labels_from_the_genuine_label_file(demo: tuple[Path, Path]) -> None:
    model_dir, _raw = demo
    paths = sorted((NIH_SHARED / "sample").glob("*.png"))[:4]
    predictions = predict_files(load_bundle(model_dir), paths, progress=False)
    label_table = read_label_file(NIH_SHARED / "Data_Entry_2017_v2020.csv.gz")
    figure = prediction_grid_figure(predictions, n=2, label_table=label_table)
    manifest = pd.read_csv(NIH_SHARED / "sample_manifest.csv").set_index("Image Index")
    titles = [ax.get_title().replace("\n", " ") for ax in figure.axes]
    assert len(titles) == 4
    for path, title, flagged in zip(paths, titles, predictions.flagged, strict=True):
        real = sorted(manifest.loc[path.name, "Finding Labels"].split("|"))
        assert title.startswith(path.name), title
        assert f"Prediction: {', '.join(flagged) or 'none flagged'}" in title
        shown = title.split("| Real: ")[1].split(", ")
        assert sorted(shown) == real, (title, real)
    assert DISCLAIMER in figure.get_suptitle()


def test_flags_follow_the_thresholds_stored_in_the_model(demo: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, raw = demo
    paths = _images(raw, 12)
    probs = _expected_probs(model_dir, paths)
    # Per finding, the median probability over these images: about half of them are flagged for each.
    cut = {name: float(np.median(probs[:, LABELS.index(name)])) for name in FINDINGS}
    per_finding = {name: {"threshold": cut[name], "sensitivity": 0.8, "specificity": 0.7} for name in cut}
    per_finding["Edema"] = {"threshold": None, "sensitivity": None, "specificity": None}  # no ROC curve
    del per_finding["Hernia"]  # not stored: 0.5
    model = _with_thresholds(model_dir, tmp_path / "model", {"method": "youden", "per_finding": per_finding})
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(model), *map(str, paths), "--out", str(out), "--quiet"]) == 0
    first, table = _read_csv(out)
    cut["Hernia"] = 0.5
    for row, p in zip(table.itertuples(index=False), probs, strict=True):
        expected = [name for name in FINDINGS if name != "Edema" and p[LABELS.index(name)] >= cut[name]]
        assert row.flagged == "|".join(expected)
    assert sum(bool(flagged) for flagged in table["flagged"]) >= 6  # the thresholds did flag findings
    assert "per-finding thresholds from the model (youden)" in first
    assert "0.5 for Hernia (none stored)" in first and "never flagged: Edema" in first


def test_without_stored_thresholds_flags_at_one_half_and_says_so(
    demo: tuple[Path, Path], tmp_path: Path
) -> None:
    model_dir, raw = demo
    model = _with_thresholds(model_dir, tmp_path / "model", None)
    paths = _images(raw, 5)
    predictions = run_predict(model, paths, out=tmp_path / "p.json", progress=False)
    document = json.loads((tmp_path / "p.json").read_text())
    assert document["disclaimer"] == DISCLAIMER
    assert "the model stores no thresholds" in document["thresholds"]["source"]
    assert set(document["thresholds"]["per_finding"].values()) == {0.5}
    probs = _expected_probs(model_dir, paths)
    for entry, p, flagged in zip(document["predictions"], probs, predictions.flagged, strict=True):
        assert entry["flagged"] == flagged == [n for n in FINDINGS if p[LABELS.index(n)] >= 0.5]
        np.testing.assert_allclose([entry["probabilities"][n] for n in LABELS], p, atol=1e-6)


def test_malformed_stored_thresholds_stop_with_the_entry_named(
    demo: tuple[Path, Path], tmp_path: Path
) -> None:
    model_dir, _raw = demo
    bad = {"method": "youden", "per_finding": {"Mass": {"threshold": 1.7}}}
    model = _with_thresholds(model_dir, tmp_path / "model", bad)
    with pytest.raises(
        ValueError, match=r"extra\.thresholds\.per_finding\.Mass: threshold must be in \[0, 1\]"
    ):
        load_thresholds(load_bundle(model))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _bad_inputs(folder: Path, good_png: Path) -> dict[str, str]:
    """Each bad input of the issue, written into `folder`: file name -> the problem the output must name."""
    folder.mkdir()
    (folder / "notes.png").write_text("patient notes, not an image\n")
    (folder / "empty.png").write_bytes(b"")
    data = good_png.read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
    (folder / "bomb.png").write_bytes(bomb + _chunk(b"IEND", b""))
    write_dicom(folder / "report.dcm", None)
    return {
        "notes.png": "not an image file",
        "empty.png": "empty file (0 bytes)",
        "truncated.png": "truncated PNG",
        "bomb.png": "image of 100000x100000 pixels exceeds the limit",
        "report.dcm": "DICOM without pixel data",
        "missing.png": "no such file or folder",
    }


def test_bad_files_are_named_one_line_each_and_the_rest_predicted(
    demo: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir, raw = demo
    good = _images(raw, 4)
    bad_dir = tmp_path / "bad"
    problems = _bad_inputs(bad_dir, good[0])
    inputs = [*map(str, good[:2]), str(bad_dir), str(bad_dir / "missing.png"), *map(str, good[2:])]
    out = tmp_path / "p.csv"
    code = main(["predict", "--model", str(model_dir), *inputs, "--out", str(out), "--quiet"])
    assert code == 1  # some failed
    err_lines = capsys.readouterr().err.strip().splitlines()
    failed = [line for line in err_lines if line.startswith("xraycls predict: failed: ")]
    assert len(failed) == len(problems)
    for name, problem in problems.items():
        (line,) = [line for line in failed if f"{bad_dir / name}: " in line]
        assert problem in line, line
    _first, table = _read_csv(out)
    assert table["path"].tolist() == [str(path) for path in good]  # no row for any failed file
    np.testing.assert_allclose(table[list(LABELS)].to_numpy(), _expected_probs(model_dir, good), atol=1e-6)
    document_out = tmp_path / "p.json"
    assert main(["predict", "--model", str(model_dir), *inputs, "--out", str(document_out), "--quiet"]) == 1
    document = json.loads(document_out.read_text())
    assert [entry["path"] for entry in document["predictions"]] == [str(path) for path in good]
    assert {Path(entry["path"]).name for entry in document["failed"]} == set(problems)


def test_all_files_failing_still_exits_one_with_an_empty_table(
    demo: tuple[Path, Path], tmp_path: Path
) -> None:
    model_dir, _raw = demo
    (tmp_path / "empty.png").write_bytes(b"")
    out = tmp_path / "p.csv"
    argv = ["predict", "--model", str(model_dir), str(tmp_path / "empty.png"), "--out", str(out)]
    assert main([*argv, "--grid", str(tmp_path / "g.png"), "--quiet"]) == 1
    first, table = _read_csv(out)
    assert DISCLAIMER in first and list(table.columns) == CSV_COLUMNS and len(table) == 0
    assert not (tmp_path / "g.png").exists()


def test_dicom_inputs_predict_as_the_same_pixels_in_a_png(demo: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, raw = demo
    png = _images(raw, 1)[0]
    pixels = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    # MONOCHROME1 stores the inverted values; the reader inverts them back.
    mono1 = write_dicom(tmp_path / "mono1.dcm", 255 - pixels, photometric="MONOCHROME1")
    # 16-bit with a window that maps the stored 0..4080 (16 x 0..255) exactly onto black..white.
    deep = pixels.astype(np.uint16) * 16
    windowed = write_dicom(tmp_path / "IM0002", deep, bits_stored=12, WindowCenter=2040.5, WindowWidth=4081)
    predictions = run_predict(model_dir, [png, mono1, windowed], device="cpu", progress=False)
    assert predictions.paths == [png, mono1, windowed] and not predictions.failures
    np.testing.assert_allclose(predictions.probabilities[1], predictions.probabilities[0], atol=1e-6)
    np.testing.assert_allclose(predictions.probabilities[2], predictions.probabilities[0], atol=1e-6)


def test_batches_threads_and_progress_do_not_change_the_answer(
    demo: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir, raw = demo
    bundle = load_bundle(model_dir)
    paths = _images(raw, 7)
    seen: list[int] = []
    small = predict_files(
        bundle, paths, batch_size=3, workers=2, progress=True, on_batch=lambda p, im, pr: seen.append(len(p))
    )
    whole = predict_files(bundle, paths, batch_size=32, workers=1, progress=False)
    assert seen == [3, 3, 1]
    assert small.paths == whole.paths == paths
    np.testing.assert_allclose(small.probabilities, whole.probabilities, atol=1e-6)
    assert "7/7" in capsys.readouterr().err  # the progress bar counted every file


def test_csv_goes_to_stdout_without_out(demo: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model_dir, raw = demo
    paths = _images(raw, 2)
    assert main(["predict", "--model", str(model_dir), *map(str, paths), "--quiet", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == f"# {lines[0][2:]}" and DISCLAIMER in lines[0]
    assert lines[1].split(",") == CSV_COLUMNS and len(lines) == 4
    assert DISCLAIMER in captured.err and "predicted 2 image(s) on cpu, 0 failed" in captured.err


def test_cuda_requested_without_cuda_is_one_clear_error(
    demo: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir, raw = demo
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    assert resolve_device("auto") == "cpu"
    code = main(
        ["predict", "--model", str(model_dir), str(_images(raw, 1)[0]), "--device", "cuda", "--quiet"]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'cuda': CUDA is not available" in err
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N, got 'tpu'"):
        resolve_device("tpu")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--out", "preds.txt"], "--out preds.txt: the name must end in .csv or .json"),
        (["--grid", "grid.jpg"], "--grid grid.jpg: the figure is a PNG"),
        (["--labels", "labels.csv"], "--labels labels.csv: the real labels are shown in the --grid figure"),
    ],
)
def test_bad_settings_stop_before_any_work(
    demo: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    model_dir, raw = demo
    assert main(["predict", "--model", str(model_dir), str(_images(raw, 1)[0]), *extra, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_no_images_found_and_missing_model_exit_two(
    demo: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir, raw = demo
    (tmp_path / "empty_folder").mkdir()
    assert main(["predict", "--model", str(model_dir), str(tmp_path / "empty_folder"), "--quiet"]) == 2
    assert "no image files found" in capsys.readouterr().err
    assert main(["predict", "--model", str(tmp_path / "nope"), str(_images(raw, 1)[0]), "--quiet"]) == 2
    assert "nope: no such folder" in capsys.readouterr().err


def test_grid_on_synthetic_images_with_their_label_file(demo: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, raw = demo
    paths = _images(raw, 5)
    grid = tmp_path / "grid.png"
    labels_file = raw / "Data_Entry_2017_v2020.csv"
    assert main(
        ["predict", "--model", str(model_dir), *map(str, paths), "--grid", str(grid), "--labels",
         str(labels_file), "--out", str(tmp_path / "p.csv"), "--quiet"]
    ) == 0  # fmt: skip
    image = cv2.imread(str(grid))
    assert image is not None and image.shape[0] > 400
    predictions = predict_files(load_bundle(model_dir), paths, progress=False)
    figure = prediction_grid_figure(predictions, n=3, label_table=read_label_file(labels_file))
    table = read_label_file(labels_file).set_index("image")
    shown = [ax for ax in figure.axes if ax.get_title()]
    assert len(shown) == 5 and len(figure.axes) == 6  # 5 images on a 2 x 3 grid (n=3, 5 images)
    for ax, path in zip(shown, paths, strict=True):
        real = [name for name in LABELS if table.loc[path.name, name]]
        assert ax.get_title().replace("\n", " ").endswith(f"Real: {', '.join(real)}")


def test_heatmaps_one_overlay_per_image_and_flagged_finding(demo: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, raw = demo
    # Effusion and Mass at threshold 0 (always flagged), the rest at 1 (never reached by a sigmoid here).
    per_finding = {name: {"threshold": 0.0 if name in ("Effusion", "Mass") else 1.0} for name in FINDINGS}
    model = _with_thresholds(model_dir, tmp_path / "model", {"method": "fixed", "per_finding": per_finding})
    paths = _images(raw, 3)
    out_dir = tmp_path / "heat"
    predictions = run_predict(model, paths, heatmaps_dir=out_dir, progress=False)
    assert predictions.flagged == [["Effusion", "Mass"]] * 3
    expected = {f"{path.name}__{name}.png" for path in paths for name in ("Effusion", "Mass")}
    assert {path.name for path in out_dir.iterdir()} == expected
    assert sorted(path.name for path in predictions.heatmaps) == sorted(expected)
    for path in predictions.heatmaps:
        assert cv2.imread(str(path)) is not None


def test_heatmaps_for_one_chosen_finding_keep_same_named_files_apart(
    demo: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir, raw = demo
    first = _images(raw, 1)[0]
    (tmp_path / "other").mkdir()
    twin = tmp_path / "other" / first.name  # the same file name in another folder
    shutil.copy(first, twin)
    out_dir = tmp_path / "heat"
    argv = ["predict", "--model", str(model_dir), str(first), str(twin), "--heatmaps", str(out_dir)]
    assert main([*argv, "--finding", "Hernia", "--out", str(tmp_path / "p.csv"), "--quiet"]) == 0
    stem = first.stem
    assert sorted(p.name for p in out_dir.iterdir()) == [
        f"{stem}.png__Hernia.png",
        f"{stem}_2.png__Hernia.png",
    ]
    assert "2 heatmap(s) in" in capsys.readouterr().out
    assert main([*argv[:5], "--finding", "Hernia", "--quiet"]) == 2  # --finding without --heatmaps
    assert "give --heatmaps DIR too" in capsys.readouterr().err
    assert main([*argv, "--finding", "No Finding", "--quiet"]) == 2
    assert "'No Finding' is not one of the findings" in capsys.readouterr().err
