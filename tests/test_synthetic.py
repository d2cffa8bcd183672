"""Synthetic NIH-format data: layout, parseable labels, patient-wise lists, determinism, planted signal."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from _project import NIH_SHARED

from xraycls.data.labels import read_label_file
from xraycls.data.splits import attach_official_split
from xraycls.data.synthetic import (
    LABEL_FILE_NAME,
    NIH_PREVALENCE,
    make_synthetic_nih,
    planted_signal_boxes,
)
from xraycls.findings import FINDINGS, LABELS, NO_FINDING

SIZE = 64


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "raw"
    summary = make_synthetic_nih(out, 300, size=SIZE, seed=7, min_prevalence=0.1)
    return out, summary


def _images(out: Path, names: list[str]) -> np.ndarray:
    return np.stack([cv2.imread(str(out / "images" / name), cv2.IMREAD_UNCHANGED) for name in names])


def test_layout_and_names_follow_nih(synth: tuple[Path, dict]) -> None:
    out, summary = synth
    names = sorted(p.name for p in (out / "images").iterdir())
    assert len(names) == 300 == summary["images"]
    assert all(len(n) == 16 and n[8] == "_" and n[:8].isdigit() and n[9:12].isdigit() for n in names)
    assert {p.name for p in out.iterdir()} == {
        "images",
        LABEL_FILE_NAME,
        "train_val_list.txt",
        "test_list.txt",
    }
    image = cv2.imread(str(out / "images" / names[0]), cv2.IMREAD_UNCHANGED)
    assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE)
    lines = (out / LABEL_FILE_NAME).read_text().splitlines()
    assert lines[0] == (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
    )
    assert all(len(line.split(",")) == 11 for line in lines[1:])


@pytest.mark.real_nih
def test_header_is_the_real_v2020_header(synth: tuple[Path, dict]) -> None:
    out, _ = synth
    with gzip.open(NIH_SHARED / "Data_Entry_2017_v2020.csv.gz", "rt") as real:
        assert (out / LABEL_FILE_NAME).read_text().splitlines()[0] == real.readline().rstrip("\n")


def test_label_file_parses_and_matches_the_summary(synth: tuple[Path, dict]) -> None:
    out, summary = synth
    table = read_label_file(out / LABEL_FILE_NAME)
    assert len(table) == 300
    assert table["image"].tolist() == sorted(p.name for p in (out / "images").iterdir())
    assert {label: int(table[label].sum()) for label in LABELS} == summary["label_counts"]
    assert table["patient_id"].nunique() == summary["patients"]
    # Several images per patient, numbered 0.. in order; multi-label images occur.
    per_patient = table.groupby("patient_id")["follow_up"].agg(["count", "max"])
    assert (per_patient["max"] == per_patient["count"] - 1).all()
    assert per_patient["count"].max() > 1 and per_patient["count"].max() <= 6
    assert (table[list(FINDINGS)].sum(axis=1) > 1).any()
    assert ((table[NO_FINDING] == 1) == (table[list(FINDINGS)].sum(axis=1) == 0)).all()
    assert set(table["sex"]) == {"M", "F"} and set(table["view"]) == {"PA", "AP"}
    assert table["age_years"].between(1, 120).all()


def test_split_lists_are_patient_wise_and_cover_every_image(synth: tuple[Path, dict]) -> None:
    out, summary = synth
    table = attach_official_split(read_label_file(out / LABEL_FILE_NAME), out)
    train_val = (out / "train_val_list.txt").read_text().split("\n")
    test = (out / "test_list.txt").read_text().split("\n")
    assert sorted(train_val + test) == sorted(table["image"])
    assert not set(train_val) & set(test)
    patients = table.groupby("patient_id")["split_official"].nunique()
    assert (patients == 1).all()
    assert 0.18 < len(test) / 300 < 0.28
    assert summary["splits"]["test"]["images"] == len(test)
    counts = table[table["split_official"] == "test"][list(LABELS)].sum()
    assert counts.to_dict() == summary["splits"]["test"]["label_counts"]
    # Every finding has positives on both sides of the split.
    assert (counts[list(FINDINGS)] > 0).all()


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path: Path) -> None:
    first = make_synthetic_nih(tmp_path / "a", 40, size=SIZE, seed=3)
    second = make_synthetic_nih(tmp_path / "b", 40, size=SIZE, seed=3, workers=2)
    other = make_synthetic_nih(tmp_path / "c", 40, size=SIZE, seed=4)
    assert first["label_counts"] == second["label_counts"]
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    for relative in files_a:
        assert (tmp_path / "a" / relative).read_bytes() == (tmp_path / "b" / relative).read_bytes(), relative
    assert (tmp_path / "a" / LABEL_FILE_NAME).read_bytes() != (tmp_path / "c" / LABEL_FILE_NAME).read_bytes()
    assert other["images"] == 40


def test_min_prevalence_is_honoured_exactly_and_nih_prevalences_otherwise(tmp_path: Path) -> None:
    summary = make_synthetic_nih(tmp_path / "min", 200, size=32, min_prevalence=0.12)
    for finding in FINDINGS:
        expected = max(round(NIH_PREVALENCE[finding] * 200), 24)
        assert summary["label_counts"][finding] == expected
    custom = make_synthetic_nih(tmp_path / "dict", 50, size=32, prevalence={"Hernia": 0.5})
    assert custom["label_counts"]["Hernia"] == 25
    assert all(custom["label_counts"][f] == 0 for f in FINDINGS if f != "Hernia")
    assert custom["label_counts"][NO_FINDING] == 25


def test_planted_signal_is_in_its_box_and_nowhere_else(synth: tuple[Path, dict]) -> None:
    out, _ = synth
    table = read_label_file(out / LABEL_FILE_NAME)
    images = _images(out, table["image"].tolist()).astype(np.float64)
    boxes = planted_signal_boxes(SIZE)
    assert list(boxes) == list(FINDINGS)
    means = {f: images[:, y0:y1, x0:x1].mean(axis=(1, 2)) for f, (x0, y0, x1, y1) in boxes.items()}
    for finding in FINDINGS:
        positive = table[finding].to_numpy() == 1
        gap = means[finding][positive].mean() - means[finding][~positive].mean()
        assert gap > 25, (finding, gap)
        # Another finding's box does not see this finding: compare images negative for that other finding.
        other = FINDINGS[(FINDINGS.index(finding) + 5) % len(FINDINGS)]
        clean = table[other].to_numpy() == 0
        leak = means[other][positive & clean].mean() - means[other][~positive & clean].mean()
        assert abs(leak) < 6, (finding, other, leak)
    # Boxes lie inside the image and do not overlap.
    for finding, (x0, y0, x1, y1) in boxes.items():
        assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE, finding
    mask = np.zeros((SIZE, SIZE), dtype=int)
    for x0, y0, x1, y1 in boxes.values():
        mask[y0:y1, x0:x1] += 1
    assert mask.max() == 1


def test_marks_stay_inside_their_boxes(tmp_path: Path) -> None:
    # Every image Hernia-only: outside the Hernia box, positives and a No Finding set look the same.
    out = tmp_path / "hernia"
    make_synthetic_nih(out, 60, size=SIZE, prevalence={"Hernia": 1.0}, seed=1)
    plain = tmp_path / "plain"
    make_synthetic_nih(plain, 60, size=SIZE, prevalence={}, seed=1)
    marked = _images(out, sorted(p.name for p in (out / "images").iterdir())).astype(float)
    clean = _images(plain, sorted(p.name for p in (plain / "images").iterdir())).astype(float)
    x0, y0, x1, y1 = planted_signal_boxes(SIZE)["Hernia"]
    outside = np.ones((SIZE, SIZE), dtype=bool)
    outside[y0:y1, x0:x1] = False
    # Same seed, same backgrounds: the only differences are inside the box.
    np.testing.assert_array_equal(marked[:, outside], clean[:, outside])
    assert np.abs(marked[:, ~outside] - clean[:, ~outside]).max() > 100


def test_bad_arguments_and_foreign_images_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n must be at least 1"):
        make_synthetic_nih(tmp_path / "x", 0)
    with pytest.raises(ValueError, match="size must be at least 32"):
        make_synthetic_nih(tmp_path / "x", 5, size=16)
    with pytest.raises(ValueError, match="unknown findings.*Pneumonitis"):
        make_synthetic_nih(tmp_path / "x", 5, size=32, prevalence={"Pneumonitis": 0.1})
    with pytest.raises(ValueError, match="min_prevalence must be within"):
        make_synthetic_nih(tmp_path / "x", 5, size=32, min_prevalence=1.5)
    with pytest.raises(ValueError, match="images_per_patient"):
        make_synthetic_nih(tmp_path / "x", 5, size=32, images_per_patient=(3, 2))
    out = tmp_path / "mixed"
    (out / "images").mkdir(parents=True)
    (out / "images" / "99999999_000.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"already holds 1 PNGs.*99999999_000.png"):
        make_synthetic_nih(out, 5, size=32)
    # Rerunning into its own output is fine (same files rewritten).
    again = tmp_path / "again"
    make_synthetic_nih(again, 10, size=32)
    assert make_synthetic_nih(again, 10, size=32)["images"] == 10


@pytest.mark.real_nih
def test_hard_coded_prevalences_match_the_real_label_file() -> None:
    real = read_label_file(NIH_SHARED / "Data_Entry_2017_v2020.csv.gz")
    for finding in FINDINGS:
        assert NIH_PREVALENCE[finding] == pytest.approx(real[finding].mean(), abs=1e-9), finding


def test_demo_sized_generation_takes_seconds(tmp_path: Path) -> None:
    start = time.perf_counter()
    make_synthetic_nih(tmp_path / "fast", 600, size=128, min_prevalence=0.08)
    # About 1 s alone on one core; the margin covers a machine shared with other test runs.
    assert time.perf_counter() - start < 10.0
    assert len(read_label_file(tmp_path / "fast" / LABEL_FILE_NAME)) == 600
