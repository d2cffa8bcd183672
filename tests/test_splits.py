"""Splits: official lists, patient-wise and image-level assignments, their sizes, determinism and leaks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _project import NIH_SHARED

from xraycls.data.labels import read_label_file
from xraycls.data.splits import (
    ROW_ORDERS,
    SPLIT_NAMES,
    TEST_LIST,
    TRAIN_VAL_LIST,
    SplitAssignment,
    assert_patient_disjoint,
    attach_official_split,
    build_split,
    read_split_list,
)
from xraycls.findings import LABELS


def _table(n_patients: int = 60, seed: int = 0) -> pd.DataFrame:
    """Patients with 1-6 images each, random labels; images named like NIH's (patient_followup.png)."""
    rng = np.random.default_rng(seed)
    per_patient = rng.integers(1, 7, size=n_patients)
    patients = np.repeat(np.arange(1, n_patients + 1) * 7, per_patient)  # ids need not be 0..n-1
    follow_up = np.concatenate([np.arange(k) for k in per_patient])
    table = pd.DataFrame(
        {
            "image": [f"{p:08d}_{f:03d}.png" for p, f in zip(patients, follow_up, strict=True)],
            "patient_id": patients.astype("int64"),
        }
    )
    labels = (rng.random((len(table), len(LABELS))) < 0.2).astype(np.uint8)
    return pd.concat([table, pd.DataFrame(labels, columns=list(LABELS))], axis=1)


def _with_official(table: pd.DataFrame, test_every: int = 4) -> pd.DataFrame:
    """Every `test_every`-th patient is official test, like NIH's patient-wise lists."""
    result = table.copy()
    is_test = (result["patient_id"] // 7) % test_every == 0
    result["split_official"] = np.where(is_test, "test", "train_val")
    return result


def _patients(table: pd.DataFrame, rows: np.ndarray) -> set[int]:
    return set(table["patient_id"].to_numpy()[rows].tolist())


# --- split lists -------------------------------------------------------------------------------------


def test_read_split_list_keeps_order_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    path.write_text("00000003_000.png\n\n  00000001_000.png \r\n00000002_001.png")
    assert read_split_list(path) == ["00000003_000.png", "00000001_000.png", "00000002_001.png"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.png\nimages/b.png\n", r"line 2: not a PNG image name: 'images/b.png'"),
        ("a.png\n\nb.jpg\n", r"line 3: not a PNG image name: 'b.jpg'"),
        ("a.png\n<html>\n", r"line 2: not a PNG image name: '<html>'"),
        ("a.png\nb.png\na.png\n", r"line 3: image 'a.png' listed again \(first on line 1\)"),
        (
            "00000001_000.png\n00030805_000.png99999999_000.png\n",
            r"line 2: not a PNG image name: '00030805_000.png99999999_000.png' \(two names run together",
        ),
    ],
)
def test_read_split_list_rejects_bad_lines(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "list.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        read_split_list(path)
    assert str(path) in str(error.value)


def _write_lists(root: Path, train_val: list[str], test: list[str]) -> None:
    (root / TRAIN_VAL_LIST).write_text("\n".join(train_val) + "\n")
    (root / TEST_LIST).write_text("\n".join(test) + "\n")


def test_attach_official_split_marks_each_image(tmp_path: Path) -> None:
    table = _with_official(_table())
    expected = table.pop("split_official")
    images = table["image"]
    # Lists may name images the table lacks (a partial label file such as Kaggle's sample).
    _write_lists(
        tmp_path,
        [*images[expected == "train_val"], "99999999_000.png"],
        [*images[expected == "test"], "x.png"],
    )
    result = attach_official_split(table, tmp_path)
    assert result["split_official"].tolist() == expected.tolist()
    assert "split_official" not in table.columns  # a copy, the input is untouched
    assert result.drop(columns="split_official").equals(table)


def test_attach_official_split_errors(tmp_path: Path) -> None:
    table = _table(10)
    images = table["image"].tolist()
    (tmp_path / TRAIN_VAL_LIST).write_text("\n".join(images))
    with pytest.raises(FileNotFoundError, match=TEST_LIST):
        attach_official_split(table, tmp_path)
    _write_lists(tmp_path, images[3:], images[:4])
    with pytest.raises(
        ValueError, match=rf"1 images are in both {TRAIN_VAL_LIST} and {TEST_LIST}: {images[3]}"
    ):
        attach_official_split(table, tmp_path)
    _write_lists(tmp_path, images[8:], images[:1])
    with pytest.raises(ValueError, match=r"7 table images are in neither") as err:
        attach_official_split(table, tmp_path)
    assert images[1] in str(err.value) and "..." in str(err.value)


# --- building splits ---------------------------------------------------------------------------------


def test_official_split_keeps_nih_test_and_carves_val_by_patient() -> None:
    table = _with_official(_table(83))  # 63 train_val patients: ceil(6.3) = 7
    split = build_split(table, "official", seed=3)
    assert split.name == "official" and not split.test_is_val and split.leaked_patients == 0
    is_test = table["split_official"].to_numpy() == "test"
    assert np.array_equal(split.indices("test"), np.flatnonzero(is_test))
    train_val_patients = _patients(table, np.flatnonzero(~is_test))
    val_patients = _patients(table, split.indices("val"))
    assert len(val_patients) == math.ceil(0.1 * len(train_val_patients))
    assert val_patients <= train_val_patients
    assert not val_patients & _patients(table, split.indices("train"))
    assert len(split.part) == len(table) and set(split.part) == {"train", "val", "test"}
    larger = build_split(table, "official", seed=3, val_fraction=0.3)
    assert len(_patients(table, larger.indices("val"))) == math.ceil(0.3 * len(train_val_patients))


def test_patient_random_split_sizes_in_patients() -> None:
    table = _table(83)  # ceil(8.3) = 9 val and ceil(16.6) = 17 test patients
    split = build_split(table, "patient_random", seed=0)
    n_patients = table["patient_id"].nunique()
    parts = {part: _patients(table, split.indices(part)) for part in ("train", "val", "test")}
    assert len(parts["test"]) == math.ceil(0.2 * n_patients) and len(parts["val"]) == math.ceil(
        0.1 * n_patients
    )
    assert len(parts["train"]) == n_patients - len(parts["test"]) - len(parts["val"])
    assert not (
        parts["train"] & parts["val"] or parts["train"] & parts["test"] or parts["val"] & parts["test"]
    )
    assert sum(len(split.indices(part)) for part in ("train", "val", "test")) == len(table)
    custom = build_split(table, "patient_random", seed=0, val_fraction=0.25, test_fraction=0.5)
    assert (
        len(_patients(table, custom.indices("test"))) == 42  # ceil(41.5)
        and len(_patients(table, custom.indices("val"))) == 21  # ceil(20.75)
    )


def test_patient_fractions_ignore_float_noise_and_accept_numpy_numbers() -> None:
    table = _table(100)
    # 0.07 * 100 is 7.000000000000001 in floating point; ceil of it must not hold out an 8th patient.
    split = build_split(table, "patient_random", seed=0, val_fraction=np.float64(0.07), test_fraction=0.2)
    assert len(_patients(table, split.indices("val"))) == 7
    assert len(_patients(table, split.indices("test"))) == 20


def test_seed_random_is_image_level_and_counts_leaked_patients() -> None:
    table = _table(60)
    split = build_split(table, "seed_random", seed=1337)
    assert split.test_is_val
    val = split.indices("val")
    assert len(val) == math.ceil(0.05 * len(table))
    assert np.array_equal(split.indices("test"), val) and not (split.part == "test").any()
    train = split.indices("train")
    assert len(train) + len(val) == len(table)
    assert split.leaked_patients == len(_patients(table, train) & _patients(table, val)) > 0
    with pytest.raises(RuntimeError, match="not patient-disjoint"):
        assert_patient_disjoint(table, split)


@pytest.mark.parametrize(
    ("n", "seed", "fraction", "expected_val"),
    [
        # Held-out rows of datasets 5.2.0 `Dataset.from_dict({"row": range(n)}).train_test_split(
        # test_size=fraction, seed=seed)["test"]`, computed with the library itself.
        (57, 0, 0.3, [1, 2, 3, 4, 10, 11, 18, 20, 21, 23, 28, 30, 36, 37, 42, 52, 53, 54]),
        (40, 1337, 0.05, [18, 33]),
    ],
)
def test_seed_random_matches_hugging_face_train_test_split(
    n: int, seed: int, fraction: float, expected_val: list[int]
) -> None:
    table = pd.DataFrame({"image": [f"{i:08d}_000.png" for i in range(n)], "patient_id": np.arange(n) // 3})
    split = build_split(table, "seed_random", seed=seed, val_fraction=fraction)
    assert split.indices("val").tolist() == expected_val


def test_seed_random_on_the_full_release_size_matches_hugging_face() -> None:
    n = 112_120
    table = pd.DataFrame({"image": np.arange(n).astype(str), "patient_id": np.arange(n) // 4})
    val = build_split(table, "seed_random", seed=1337).indices("val")
    assert len(val) == 5_606
    # The first five rows of the guide-style held-out set from datasets 5.2.0 (seed 1337, test_size 0.05).
    assert {60849, 4333, 105356, 55001, 16092} <= set(val.tolist())


def _held_out_names(table: pd.DataFrame, row_order: str, seed: int = 1337) -> set[str]:
    split = build_split(table, "seed_random", seed=seed, row_order=row_order)
    return set(table["image"].to_numpy()[split.indices("val")].tolist())


def test_seed_random_in_file_name_order_permutes_the_sorted_names() -> None:
    table = _table(80)
    shuffled = table.sample(frac=1.0, random_state=3).reset_index(drop=True)
    by_name = table.sort_values("image").reset_index(drop=True)
    # File-name order is the label-file order of the name-sorted table, whatever order the rows came in.
    expected = _held_out_names(by_name, "label_file")
    assert _held_out_names(shuffled, "file_name") == _held_out_names(table, "file_name") == expected
    assert _held_out_names(shuffled, "label_file") != expected
    split = build_split(shuffled, "seed_random", seed=1337, row_order="file_name")
    assert len(split.indices("val")) == math.ceil(0.05 * len(table)) and split.part.shape == (len(table),)


@pytest.mark.parametrize("name", ["official", "patient_random"])
def test_patient_wise_splits_ignore_the_row_order_setting(name: str) -> None:
    table = _with_official(_table(50)).sample(frac=1.0, random_state=1).reset_index(drop=True)
    parts = [build_split(table, name, seed=4, row_order=order).part for order in ROW_ORDERS]
    assert np.array_equal(*parts)


def test_unknown_row_order_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"unknown row order 'shuffled'; expected one of label_file, file_name"
    ):
        build_split(_table(10), "seed_random", seed=0, row_order="shuffled")


@pytest.mark.parametrize("name", SPLIT_NAMES)
def test_same_seed_same_split_other_seed_other_split(name: str) -> None:
    table = _with_official(_table(120))
    first = build_split(table, name, seed=11)
    assert np.array_equal(first.part, build_split(table, name, seed=11).part)
    assert not np.array_equal(first.part, build_split(table, name, seed=12).part)


@pytest.mark.parametrize("name", ["official", "patient_random"])
def test_patient_wise_splits_do_not_depend_on_row_order(name: str) -> None:
    table = _with_official(_table(50))
    shuffled = table.sample(frac=1.0, random_state=5).reset_index(drop=True)
    by_patient = {}
    for frame in (table, shuffled):
        split = build_split(frame, name, seed=2)
        by_patient[len(by_patient)] = dict(zip(frame["patient_id"], split.part, strict=True))
    assert by_patient[0] == by_patient[1]


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("random", {}, r"unknown split name 'random'; expected one of official, patient_random, seed_random"),
        ("patient_random", {"val_fraction": 0.0}, r"val_fraction must be in \(0, 1\), got 0.0"),
        ("patient_random", {"val_fraction": 1.0}, r"val_fraction must be in \(0, 1\), got 1.0"),
        ("patient_random", {"test_fraction": -0.1}, r"test_fraction must be in \(0, 1\), got -0.1"),
        ("seed_random", {"val_fraction": 1.5}, r"val_fraction must be in \(0, 1\), got 1.5"),
        ("patient_random", {"val_fraction": 0.5, "test_fraction": 0.5}, r"must be < 1, got 0.5 \+ 0.5"),
        (
            "seed_random",
            {"test_fraction": 0.1},
            r"test_fraction must be None for split 'seed_random' \(got 0.1\)",
        ),
        ("official", {"test_fraction": 0.2}, r"test_fraction must be None for split 'official'"),
    ],
)
def test_bad_settings_name_the_setting_and_value(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_split(_with_official(_table(20)), name, seed=0, **kwargs)


def test_official_needs_the_attached_column_and_enough_patients() -> None:
    with pytest.raises(ValueError, match="needs column split_official: call attach_official_split"):
        build_split(_table(20), "official", seed=0)
    with pytest.raises(ValueError, match="too few"):
        build_split(_table(2), "patient_random", seed=0)
    with pytest.raises(ValueError, match="lacks columns patient_id"):
        build_split(_table(5).drop(columns="patient_id"), "seed_random", seed=0)


def test_assert_patient_disjoint_names_patients() -> None:
    table = pd.DataFrame({"image": [f"{i}.png" for i in range(6)], "patient_id": [5, 5, 8, 8, 9, 9]})
    part = np.array(["train", "val", "train", "train", "test", "test"], dtype=object)
    assignment = SplitAssignment("custom", part, leaked_patients=0, test_is_val=False)
    with pytest.raises(
        RuntimeError, match=r"'custom' is not patient-disjoint: 1 patients .* e.g. 5 \(train\+val\)"
    ):
        assert_patient_disjoint(table, assignment)
    part[1] = "train"
    assert_patient_disjoint(table, assignment)  # now every patient sits in one part


def test_summary_counts_images_patients_and_positives() -> None:
    table = _with_official(_table(40))
    split = build_split(table, "official", seed=0)
    summary = split.summary(table)
    assert (
        summary["split"] == "official" and summary["leaked_patients"] == 0 and summary["test_is_val"] is False
    )
    for part in ("train", "val", "test"):
        rows = table[split.part == part]
        assert summary["images"][part] == len(rows)
        assert summary["patients"][part] == rows["patient_id"].nunique()
        assert summary["positives"][part] == {label: int(rows[label].sum()) for label in LABELS}
    seeded = build_split(table, "seed_random", seed=0).summary(table)
    assert seeded["test_is_val"] is True and seeded["images"]["test"] == seeded["images"]["val"] > 0
    with pytest.raises(ValueError, match="unknown split part 'validation'"):
        split.indices("validation")


# --- the genuine NIH files ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_table() -> pd.DataFrame:
    return attach_official_split(read_label_file(NIH_SHARED / "Data_Entry_2017_v2020.csv.gz"), NIH_SHARED)


@pytest.mark.real_nih
def test_real_official_lists_are_patient_disjoint(real_table: pd.DataFrame) -> None:
    train_val = read_split_list(NIH_SHARED / TRAIN_VAL_LIST)
    test = read_split_list(NIH_SHARED / TEST_LIST)
    assert (len(train_val), len(test)) == (86_524, 25_596)
    patient_of = dict(zip(real_table["image"], real_table["patient_id"], strict=True))
    assert not {patient_of[name] for name in train_val} & {patient_of[name] for name in test}
    assert real_table["split_official"].value_counts().to_dict() == {"train_val": 86_524, "test": 25_596}


@pytest.mark.real_nih
def test_real_official_split_with_validation_is_patient_disjoint(real_table: pd.DataFrame) -> None:
    split = build_split(real_table, "official", seed=1337, val_fraction=0.1)
    assert_patient_disjoint(real_table, split)
    summary = split.summary(real_table)
    assert summary["images"]["test"] == 25_596
    assert summary["images"]["train"] + summary["images"]["val"] == 86_524
    train_val_patients = real_table.loc[real_table["split_official"] == "train_val", "patient_id"].nunique()
    assert summary["patients"]["val"] == math.ceil(0.1 * train_val_patients)


@pytest.mark.real_nih
def test_real_seed_random_leaks_patients(real_table: pd.DataFrame) -> None:
    split = build_split(real_table, "seed_random", seed=1337)
    assert len(split.indices("val")) == math.ceil(0.05 * 112_120) == 5_606
    assert split.leaked_patients > 1_000  # 3,313 with this seed and the file's row order
    assert split.leaked_patients == len(
        _patients(real_table, split.indices("train")) & _patients(real_table, split.indices("val"))
    )


@pytest.mark.real_nih
def test_real_partial_label_table_gets_the_official_split(real_table: pd.DataFrame) -> None:
    part = real_table.drop(columns="split_official").iloc[::50].reset_index(drop=True)  # like Kaggle's sample
    attached = attach_official_split(part, NIH_SHARED)
    assert attached["split_official"].tolist() == real_table["split_official"].iloc[::50].tolist()


@pytest.mark.real_nih
def test_real_seed_random_in_file_name_order_has_the_guides_sizes(real_table: pd.DataFrame) -> None:
    by_name = build_split(real_table, "seed_random", seed=1337, row_order="file_name")
    # The guide's logs: 106,514 training and 5,606 validation images (ceil(0.05 * 112,120) held out).
    assert len(real_table) == 112_120
    assert (len(by_name.indices("train")), len(by_name.indices("val"))) == (106_514, 5_606)
    # The label file is not in file-name order, so the same seed holds out other images ...
    by_file = build_split(real_table, "seed_random", seed=1337, row_order="label_file")
    assert not np.array_equal(by_name.part, by_file.part)
    # ... and file-name order is the label-file order of the name-sorted table, row-aligned either way.
    sorted_table = real_table.sort_values("image", kind="stable").reset_index(drop=True)
    names = real_table["image"].to_numpy()
    sorted_split = build_split(sorted_table, "seed_random", seed=1337, row_order="label_file")
    assert set(names[by_name.indices("val")]) == set(
        sorted_table["image"].to_numpy()[sorted_split.indices("val")]
    )
    assert by_name.leaked_patients == len(
        _patients(real_table, by_name.indices("train")) & _patients(real_table, by_name.indices("val"))
    )
