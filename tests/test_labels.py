"""Label files: every NIH variant parses to one table; bad input names the file, the row and the problem."""

from __future__ import annotations

import csv
import gzip
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _project import NIH_SHARED

from xraycls.data.labels import (
    LABEL_FILE_NAMES,
    TABLE_COLUMNS,
    LabelFileError,
    find_label_file,
    label_totals,
    read_label_file,
)
from xraycls.findings import LABELS

# (image, finding labels, follow-up, patient id, age in years, sex, view)
RECORDS = [
    ("00000001_000.png", "Cardiomegaly", 0, 1, 57, "M", "PA"),
    ("00000001_001.png", "Cardiomegaly|Emphysema", 1, 1, 58, "M", "PA"),
    ("00000002_000.png", "No Finding", 0, 2, 80, "M", "PA"),
    ("00000003_001.png", "Hernia", 0, 3, 74, "F", "PA"),
    ("00000013_005.png", "Emphysema|Infiltration|Pleural_Thickening|Pneumothorax", 5, 13, 60, "M", "AP"),
    ("00000032_012.png", "Atelectasis|Consolidation|Edema|Effusion|Mass|Nodule", 12, 32, 55, "F", "AP"),
    ("00000099_000.png", "Fibrosis|Pneumonia", 0, 99, 100, "F", "PA"),
]
SIZE_FIELDS = "2500,2048,0.168,0.168"

V2020_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
BOX_HEADER = V2020_HEADER.replace("Patient Gender", "Patient Sex")
KAGGLE_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImageWidth,OriginalImageHeight,OriginalImagePixelSpacing_x,OriginalImagePixelSpacing_y"
)


def _v2020_text(records=RECORDS) -> str:
    rows = [
        f"{i},{lab},{fu},{pid},{age},{sex},{view},{SIZE_FIELDS}"
        for i, lab, fu, pid, age, sex, view in records
    ]
    return "\n".join([V2020_HEADER, *rows]) + "\n"


def _original_2017_text(records=RECORDS) -> str:
    # Zero-padded numbers, "058Y" ages, CRLF, a header ending in "," over 11-field rows.
    rows = [
        f"{i},{lab},{fu:03d},{pid:08d},{age:03d}Y,{sex},{view},{SIZE_FIELDS}"
        for i, lab, fu, pid, age, sex, view in records
    ]
    return "\r\n".join([V2020_HEADER + ",", *rows]) + "\r\n"


def _box_text(records=RECORDS) -> str:
    rows = [
        f"{i},{lab},{fu},{pid},{age},{sex},{view},{SIZE_FIELDS},"
        for i, lab, fu, pid, age, sex, view in records
    ]
    return "\n".join([BOX_HEADER + ",", *rows]) + "\n"


def _kaggle_text(records=RECORDS) -> str:
    rows = [
        f"{i},{lab},{fu},{pid},{age:03d}Y,{sex},{view},{SIZE_FIELDS}"
        for i, lab, fu, pid, age, sex, view in records
    ]
    return "\n".join([KAGGLE_HEADER, *rows]) + "\n"


VARIANTS = {
    "Data_Entry_2017_v2020.csv": _v2020_text,
    "Data_Entry_2017.csv": _original_2017_text,
    "box_today.csv": _box_text,
    "sample_labels.csv": _kaggle_text,
}


def _write(path: Path, text: str) -> Path:
    data = text.encode("utf-8")
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)  # bytes, so CRLF stays CRLF
    return path


def _expected_table(records=RECORDS) -> pd.DataFrame:
    """Built without the reader: one 0/1 column per label by whole-name membership."""
    rows = []
    for image, labels, follow_up, patient, age, sex, view in records:
        names = set(labels.split("|"))
        rows.append([image, patient, follow_up, age, sex, view, *[int(label in names) for label in LABELS]])
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    table = table.astype({"patient_id": "int64", "follow_up": "int64", "age_years": "int64"})
    table[list(LABELS)] = table[list(LABELS)].astype("uint8")
    return table.astype({"image": str, "sex": str, "view": str})


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_parses_to_the_same_table(tmp_path: Path, variant: str, compressed: bool) -> None:
    path = _write(tmp_path / (variant + (".gz" if compressed else "")), VARIANTS[variant]())
    table = read_label_file(path)
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert isinstance(table.index, pd.RangeIndex)
    assert table["image"].tolist() == [record[0] for record in RECORDS]  # file order kept
    assert all(table[label].dtype == np.uint8 for label in LABELS)
    assert pd.api.types.is_string_dtype(table["image"])
    pd.testing.assert_frame_equal(table, _expected_table())


def test_variants_really_differ_on_disk(tmp_path: Path) -> None:
    """Guards the fixtures: the 2017 file is CRLF and padded, Box's has trailing commas."""
    original = _write(tmp_path / "a.csv", _original_2017_text()).read_bytes()
    assert (
        b"\r\n" in original and b",00000001,058Y," in original and original.split(b"\r\n")[0].endswith(b",")
    )
    box = _write(tmp_path / "b.csv", _box_text()).read_bytes().decode()
    assert all(line.endswith(",") for line in box.splitlines()) and "Patient Sex" in box


def test_age_suffixes_become_whole_years(tmp_path: Path) -> None:
    text = _v2020_text(RECORDS[:5])
    ages = ["058Y", "030M", "011M", "400D", " 7 "]
    lines = text.splitlines()
    for row, age in enumerate(ages, start=1):
        fields = lines[row].split(",")
        fields[4] = age
        lines[row] = ",".join(fields)
    table = read_label_file(_write(tmp_path / "ages.csv", "\n".join(lines) + "\n"))
    assert table["age_years"].tolist() == [58, 2, 0, 1, 7]


def test_spaces_around_label_names_and_blank_lines_are_tolerated(tmp_path: Path) -> None:
    records = [(*RECORDS[0][:1], " Mass | Nodule ", *RECORDS[0][2:]), *RECORDS[1:3]]
    lines = _v2020_text(records).splitlines()
    table = read_label_file(
        _write(tmp_path / "x.csv", "\n".join([*lines[:2], "", *lines[2:], "", ""]) + "\n")
    )
    assert len(table) == 3
    assert table.loc[0, ["Mass", "Nodule"]].tolist() == [1, 1]
    assert int(table.loc[0, list(LABELS)].sum()) == 2


def test_find_label_file_prefers_v2020_then_2017_then_sample(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        find_label_file(tmp_path)
    assert str(tmp_path) in str(error.value) and "Data_Entry_2017.csv.gz" in str(error.value)
    _write(tmp_path / "sample_labels.csv", _kaggle_text())
    assert find_label_file(tmp_path).name == "sample_labels.csv"
    _write(tmp_path / "Data_Entry_2017.csv.gz", _original_2017_text())
    assert find_label_file(tmp_path).name == "Data_Entry_2017.csv.gz"
    _write(tmp_path / "Data_Entry_2017_v2020.csv", _v2020_text())
    assert find_label_file(tmp_path).name == "Data_Entry_2017_v2020.csv"
    assert LABEL_FILE_NAMES[0] == "Data_Entry_2017_v2020.csv"


def _replace_field(text: str, line: int, position: int, value: str) -> str:
    lines = text.splitlines()
    fields = lines[line - 1].split(",")
    fields[position] = value
    lines[line - 1] = ",".join(fields)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("line", "position", "value", "row", "problem"),
    [
        (3, 1, "Cardiomegaly|Infiltrate", 3, "unknown label 'Infiltrate'"),
        # Whole-name matching: neither a prefix nor a longer name counts as a label.
        (4, 1, "Pleural", 4, "unknown label 'Pleural'"),
        (4, 1, "Masses", 4, "unknown label 'Masses'"),
        (5, 1, "", 5, "empty Finding Labels"),
        (5, 1, "Mass||Nodule", 5, "empty label name"),
        (4, 1, "No Finding|Mass", 4, "'No Finding' together with a finding"),
        (6, 4, "fifty", 6, "unparseable Patient Age"),
        (6, 4, "58X", 6, "unparseable Patient Age"),
        (7, 3, "P0001", 7, "Patient ID is not a whole number"),
        (7, 2, "-1", 7, "Follow-up # is not a whole number"),
        (2, 5, "X", 2, "Patient Gender not one of M/F"),
        (8, 6, "LL", 8, "View Position not one of PA/AP"),
        (2, 0, "", 2, "empty Image Index"),
    ],
)
def test_bad_rows_name_file_row_and_problem(
    tmp_path: Path, line: int, position: int, value: str, row: int, problem: str
) -> None:
    path = _write(
        tmp_path / "Data_Entry_2017_v2020.csv", _replace_field(_v2020_text(), line, position, value)
    )
    with pytest.raises(LabelFileError) as error:
        read_label_file(path)
    assert error.value.row == row
    assert problem in str(error.value)
    assert str(path) in str(error.value) and f"row {row}" in str(error.value)


def test_duplicate_image_names_both_rows(tmp_path: Path) -> None:
    records = [*RECORDS, (RECORDS[1][0], "Mass", 9, 1, 60, "M", "PA")]
    path = _write(tmp_path / "dup.csv.gz", _original_2017_text(records))
    with pytest.raises(
        LabelFileError, match=r"duplicate image name '00000001_001.png' in rows 3 and 9"
    ) as error:
        read_label_file(path)
    assert error.value.row == 3 and "dup.csv.gz" in str(error.value)


def test_row_numbers_count_blank_lines_and_list_further_bad_rows(tmp_path: Path) -> None:
    lines = _v2020_text().splitlines()
    lines[3] = lines[3].replace(",M,", ",Q,")
    lines[6] = lines[6].replace(",F,", ",Q,")
    path = _write(tmp_path / "x.csv", "\n".join([*lines[:2], "", *lines[2:]]) + "\n")
    with pytest.raises(
        LabelFileError, match=r"row 5: Patient Gender not one of M/F: 'Q' \(and 1 more rows: 8\)"
    ):
        read_label_file(path)


def test_missing_columns_are_named(tmp_path: Path) -> None:
    text = _v2020_text().replace("View Position", "View").replace("Patient Age", "Age")
    with pytest.raises(LabelFileError, match=r"row 1: missing required columns: Patient Age, View Position"):
        read_label_file(_write(tmp_path / "x.csv", text))


def test_row_with_too_many_fields(tmp_path: Path) -> None:
    lines = _v2020_text().splitlines()
    lines[4] += ",1,2"
    with pytest.raises(LabelFileError, match=r"row 5: 13 fields, but the header has 11"):
        read_label_file(_write(tmp_path / "x.csv", "\n".join(lines) + "\n"))
    lines = _v2020_text().splitlines()
    lines[4] += ",junk"  # one more field is read (a trailing comma), but it must be empty
    with pytest.raises(LabelFileError, match=r"row 5: more fields than the header's 11: 'junk'"):
        read_label_file(_write(tmp_path / "x.csv", "\n".join(lines) + "\n"))


def test_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(LabelFileError, match="empty file"):
        read_label_file(_write(tmp_path / "empty.csv", ""))
    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        read_label_file(tmp_path / "nothing.csv")
    (tmp_path / "broken.csv.gz").write_bytes(b"not gzip at all")
    with pytest.raises(LabelFileError, match="broken.csv.gz"):
        read_label_file(tmp_path / "broken.csv.gz")


def test_label_totals_counts_positives_in_label_order() -> None:
    totals = label_totals(_expected_table())
    assert list(totals.index) == list(LABELS)
    assert totals["Emphysema"] == 2 and totals["Cardiomegaly"] == 2 and totals["No Finding"] == 1
    assert totals["Atelectasis"] == 1 and int(totals.sum()) == 17
    with pytest.raises(ValueError, match="Hernia"):
        label_totals(_expected_table().drop(columns=["Hernia"]))


# --- the genuine NIH file ----------------------------------------------------------------------------

REAL_FILE = NIH_SHARED / "Data_Entry_2017_v2020.csv.gz"
# Images per label in the v2020 file, checked against the file itself (and the independent count below).
KNOWN_TOTALS = {
    "Atelectasis": 11559,
    "Cardiomegaly": 2776,
    "Effusion": 13317,
    "Infiltration": 19894,
    "Mass": 5782,
    "Nodule": 6331,
    "Pneumonia": 1431,
    "Pneumothorax": 5302,
    "Consolidation": 4667,
    "Edema": 2303,
    "Emphysema": 2516,
    "Fibrosis": 1686,
    "Pleural_Thickening": 3385,
    "Hernia": 227,
    "No Finding": 60361,
}


@pytest.fixture(scope="module")
def real_table() -> tuple[pd.DataFrame, float]:
    start = time.perf_counter()
    table = read_label_file(REAL_FILE)
    return table, time.perf_counter() - start


@pytest.mark.real_nih
def test_real_file_shape_and_speed(real_table: tuple[pd.DataFrame, float]) -> None:
    table, seconds = real_table
    assert len(table) == 112_120 and table["patient_id"].nunique() == 30_805
    assert list(table.columns) == list(TABLE_COLUMNS)
    assert table["image"].is_unique
    # Generous bound for a shared 2-core machine; it takes about 0.5 s alone.
    assert seconds < 4.0, f"reading the real label file took {seconds:.1f} s"
    assert (table["image"].str[:8].astype("int64") == table["patient_id"]).all()
    assert table["sex"].value_counts().to_dict() == {"M": 63_340, "F": 48_780}
    assert table["view"].value_counts().to_dict() == {"PA": 67_310, "AP": 44_810}
    # v2020 corrected the 2017 file's impossible ages (over 100 years).
    assert table["age_years"].between(0, 95).all() and table["age_years"].max() == 95


@pytest.mark.real_nih
def test_real_totals_match_an_independent_count(real_table: tuple[pd.DataFrame, float]) -> None:
    counts: Counter[str] = Counter()
    with gzip.open(REAL_FILE, "rt", newline="") as handle:
        rows = csv.reader(handle)
        next(rows)
        for row in rows:
            counts.update(set(row[1].split("|")))
    totals = label_totals(real_table[0])
    assert totals.to_dict() == dict(counts)
    assert totals.to_dict() == KNOWN_TOTALS


@pytest.mark.real_nih
def test_real_sample_images_have_manifest_labels(real_table: tuple[pd.DataFrame, float]) -> None:
    manifest = pd.read_csv(NIH_SHARED / "sample_manifest.csv", dtype=str)
    assert len(manifest) == 100
    table = real_table[0].set_index("image")
    for image, labels in zip(manifest["Image Index"], manifest["Finding Labels"], strict=True):
        row = table.loc[image, list(LABELS)]
        assert {label for label in LABELS if row[label] == 1} == set(labels.split("|")), image


@pytest.mark.real_nih
def test_real_rows_rewritten_as_2017_and_box_files_parse_identically(
    tmp_path: Path, real_table: tuple[pd.DataFrame, float]
) -> None:
    table = real_table[0].iloc[:3000]
    flags = table[list(LABELS)].to_numpy() == 1
    names = np.array(LABELS)
    columns = ["image", "follow_up", "patient_id", "age_years", "sex", "view"]
    records = [
        (image, "|".join(names[row_flags]), *rest)
        for (image, *rest), row_flags in zip(table[columns].itertuples(index=False), flags, strict=True)
    ]
    for name, writer in (("Data_Entry_2017.csv.gz", _original_2017_text), ("box.csv", _box_text)):
        parsed = read_label_file(_write(tmp_path / name, writer(records)))
        pd.testing.assert_frame_equal(parsed, table.reset_index(drop=True))
