"""Read any variant of the NIH ChestX-ray14 label file into one table.

NIH Clinical Center, ChestX-ray14 (Wang et al., "ChestX-ray8", CVPR 2017): 112,120 frontal images of 30,805
patients, https://nihcc.app.box.com/v/ChestXray-NIHCC. Accepted variants, plain or gzip-compressed:

- `Data_Entry_2017_v2020.csv` (v2020 revision): plain ages and numbers, LF line ends;
- `Data_Entry_2017.csv` (original 2017): ages like `058Y`, zero-padded IDs and follow-up numbers, CRLF line
  ends, a header ending in `,` (an empty 12th column) over 11-field rows;
- the file NIH Box serves today: `Patient Sex` instead of `Patient Gender`, a trailing comma on every line;
- Kaggle's 5% `sample_labels.csv`: image-size columns renamed, ages like `060Y`.

The header names `OriginalImage[Width,Height]` and `OriginalImagePixelSpacing[x,y]` hold a comma each, and
each such name spans two data fields, so columns are located by their field position in the header (one
comma-separated header token per data field), never by a name-based CSV header. Only the seven columns
below are read; the image-size columns are not used by xraycls.
"""

from __future__ import annotations

import gzip
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from xraycls.findings import FINDINGS, LABELS, NO_FINDING

__all__ = [
    "LABEL_FILE_NAMES",
    "TABLE_COLUMNS",
    "LabelFileError",
    "find_label_file",
    "label_totals",
    "read_label_file",
]

log = logging.getLogger(__name__)

LABEL_FILE_NAMES: tuple[str, ...] = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv", "sample_labels.csv")
# Columns of the table `read_label_file` returns, in order: metadata, then the 15 labels (uint8 0/1).
TABLE_COLUMNS: tuple[str, ...] = ("image", "patient_id", "follow_up", "age_years", "sex", "view", *LABELS)

# Source header name (lower case) -> table column. Box's current file says "Patient Sex".
_SOURCE_COLUMNS: dict[str, str] = {
    "image index": "image",
    "finding labels": "labels",
    "follow-up #": "follow_up",
    "patient id": "patient_id",
    "patient age": "age",
    "patient gender": "sex",
    "patient sex": "sex",
    "view position": "view",
}
_REQUIRED_NAMES: dict[str, str] = {
    "image": "Image Index",
    "labels": "Finding Labels",
    "follow_up": "Follow-up #",
    "patient_id": "Patient ID",
    "age": "Patient Age",
    "sex": "Patient Gender (or Patient Sex)",
    "view": "View Position",
}
_SEXES = ("M", "F")
_VIEWS = ("PA", "AP")
# Ages are whole years ("58", "058Y"); "M" (months) and "D" (days) suffixes are floored to completed years.
_AGE_PATTERN = r"^(\d+)\s*([YyMmDd]?)$"
_DAYS_PER_YEAR = 365
_MAX_LISTED = 5  # bad rows named in one message


class LabelFileError(ValueError):
    """A label file that cannot be read: names the file, the row (1-based file line) and the problem."""

    def __init__(self, path: Path | str, row: int | None, problem: str) -> None:
        self.path, self.row, self.problem = Path(path), row, problem
        where = f"{self.path}" if row is None else f"{self.path}, row {row}"
        super().__init__(f"{where}: {problem}")


def find_label_file(root: Path) -> Path:
    """The first of `LABEL_FILE_NAMES` (each name, then its `.gz`) that exists in `root`."""
    root = Path(root)
    tried = [name for base in LABEL_FILE_NAMES for name in (base, f"{base}.gz")]
    for name in tried:
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"no NIH label file in {root}: tried {', '.join(tried)}")


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _header_positions(path: Path) -> tuple[dict[str, int], int]:
    """Map each needed table column to its field position; also return the header's field count."""
    try:
        with _open_text(path) as handle:
            header = handle.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise LabelFileError(path, 1, f"cannot read the header ({exc})") from exc
    if not header.strip():
        raise LabelFileError(path, 1, "empty file or empty header line")
    # One token per data field: "OriginalImage[Width,Height]" splits into two tokens, as its data does.
    tokens = [token.strip().lower() for token in header.split(",")]
    positions: dict[str, int] = {}
    for index, token in enumerate(tokens):
        column = _SOURCE_COLUMNS.get(token)
        if column is not None and column not in positions:
            positions[column] = index
    missing = [name for column, name in _REQUIRED_NAMES.items() if column not in positions]
    if missing:
        raise LabelFileError(path, 1, f"missing required columns: {', '.join(missing)} (header: {header!r})")
    return positions, len(tokens)


def _read_fields(path: Path, n_fields: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Data rows as strings (one column per header field, RangeIndex) and each row's 1-based file line."""
    # One extra field tolerates a trailing comma on rows under a header without one.
    try:
        frame = pd.read_csv(
            path,
            header=None,
            skiprows=1,
            names=range(n_fields + 1),
            dtype=str,
            na_filter=False,
            skip_blank_lines=False,  # keeps row k on file line k + 2, so errors can name the line
            encoding="utf-8-sig",
            compression="infer",
        )
    except pd.errors.ParserError as exc:
        found = re.search(r"line (\d+), saw (\d+)", str(exc))
        if found:
            line, saw = int(found.group(1)), int(found.group(2))
            raise LabelFileError(path, line, f"{saw} fields, but the header has {n_fields}") from exc
        raise LabelFileError(path, None, f"cannot parse as CSV ({exc})") from exc
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise LabelFileError(path, None, f"cannot read ({exc})") from exc
    lines = np.arange(len(frame)) + 2
    extra = frame[n_fields]
    _raise_if_any(path, lines, extra != "", f"more fields than the header's {n_fields}", extra)
    # Blank lines (a stray empty line) carry no image: drop them, keep their neighbours' line numbers.
    blank = (frame == "").all(axis=1).to_numpy()
    return frame[~blank].reset_index(drop=True), lines[~blank]


def _raise_if_any(
    path: Path, lines: np.ndarray, bad: ArrayLike, problem: str, values: ArrayLike | None = None
) -> None:
    """Raise one LabelFileError for the first bad row, listing up to `_MAX_LISTED` more by line."""
    bad = np.asarray(bad, dtype=bool)
    if not bad.any():
        return
    rows = np.flatnonzero(bad)
    detail = problem if values is None else f"{problem}: {np.asarray(values)[rows[0]]!r}"
    if len(rows) > 1:
        more = ", ".join(str(line) for line in lines[rows[1 : 1 + _MAX_LISTED]])
        suffix = ", ..." if len(rows) > 1 + _MAX_LISTED else ""
        detail += f" (and {len(rows) - 1} more rows: {more}{suffix})"
    raise LabelFileError(path, int(lines[rows[0]]), detail)


def _by_unique(column: pd.Series, parse: Callable[[pd.Series], ArrayLike]) -> np.ndarray:
    """Apply `parse` (Series -> array) to the distinct values only: a few hundred instead of 112,120 rows."""
    codes, uniques = pd.factorize(column.to_numpy(dtype=object))
    return np.asarray(parse(pd.Series(uniques, dtype=object)))[codes]


def _parse_int(path: Path, lines: np.ndarray, column: pd.Series, what: str) -> np.ndarray:
    # Zero-padded in the 2017 file ("00000001"); 18 digits at most so int64 cannot overflow.
    valid = _by_unique(column, lambda text: text.str.strip().str.fullmatch(r"\d{1,18}"))
    _raise_if_any(path, lines, ~valid, f"{what} is not a whole number", column)
    return _by_unique(column, lambda text: text.str.strip().astype("int64")).astype("int64")


def _age_years(text: pd.Series) -> np.ndarray:
    parts = text.str.strip().str.extract(_AGE_PATTERN)
    value = pd.to_numeric(parts[0]).fillna(-1).astype("int64").to_numpy()
    unit = parts[1].fillna("").str.upper().to_numpy()
    return np.where(unit == "M", value // 12, np.where(unit == "D", value // _DAYS_PER_YEAR, value))


def _parse_age(path: Path, lines: np.ndarray, column: pd.Series) -> np.ndarray:
    years = _by_unique(column, _age_years).astype("int64")
    _raise_if_any(path, lines, years < 0, "unparseable Patient Age", column)
    return years


def _parse_choice(
    path: Path, lines: np.ndarray, column: pd.Series, what: str, allowed: tuple[str, ...]
) -> np.ndarray:
    text = _by_unique(column, lambda values: values.str.strip().str.upper())
    _raise_if_any(path, lines, ~np.isin(text, allowed), f"{what} not one of {'/'.join(allowed)}", column)
    return text


def _parse_labels(path: Path, lines: np.ndarray, column: pd.Series) -> np.ndarray:
    """`Finding Labels` -> uint8 [N, 15] in `LABELS` order; names split on '|' and matched whole."""
    # Parse each distinct label string once (about 800 in the full file), then gather rows by code.
    row_codes, uniques = pd.factorize(column.to_numpy(dtype=object))
    text = pd.Series(uniques, dtype=object).str.strip()
    per_row_text = np.asarray(column, dtype=object)
    _raise_if_any(path, lines, (text == "").to_numpy()[row_codes], "empty Finding Labels")
    names = text.str.split("|").explode().str.strip()
    owner = names.index.to_numpy()  # which distinct string each name came from
    names = names.to_numpy(dtype=object)
    empty = np.zeros(len(uniques), dtype=bool)
    empty[owner[names == ""]] = True
    _raise_if_any(path, lines, empty[row_codes], "empty label name in Finding Labels", per_row_text)
    codes = pd.Index(LABELS).get_indexer(names)  # -1 for a name not in LABELS
    if (codes < 0).any():
        # Distinct strings keep file order, so the first unknown name is the one on the earliest row.
        name = names[np.flatnonzero(codes < 0)[0]]
        unknown = np.zeros(len(uniques), dtype=bool)
        unknown[owner[names == name]] = True
        _raise_if_any(
            path, lines, unknown[row_codes], f"unknown label {name!r} in Finding Labels", per_row_text
        )
    matrix = np.zeros((len(uniques), len(LABELS)), dtype=np.uint8)
    matrix[owner, codes] = 1
    contradictory = (matrix[:, LABELS.index(NO_FINDING)] == 1) & (matrix[:, : len(FINDINGS)].sum(axis=1) > 0)
    _raise_if_any(
        path, lines, contradictory[row_codes], f"{NO_FINDING!r} together with a finding", per_row_text
    )
    return matrix[row_codes]


def _check_unique_images(path: Path, lines: np.ndarray, images: pd.Series) -> None:
    duplicated = images.duplicated(keep=False).to_numpy()
    if not duplicated.any():
        return
    name = images.iloc[int(np.flatnonzero(duplicated)[0])]
    same = lines[(images == name).to_numpy()].tolist()
    others = int(images[duplicated].nunique()) - 1
    more = f" ({others} more duplicated names)" if others else ""
    raise LabelFileError(
        path, same[0], f"duplicate image name {name!r} in rows {' and '.join(map(str, same))}{more}"
    )


def read_label_file(path: Path) -> pd.DataFrame:
    """One row per image, in file order (RangeIndex), with columns `TABLE_COLUMNS`.

    `image`, `sex` ("M"/"F") and `view` ("PA"/"AP") are strings; `patient_id`, `follow_up` and `age_years`
    (whole years; `M` months and `D` days suffixes floored to completed years) are int64; the 15 `LABELS`
    columns are uint8 0/1. Ages are kept as written: the 2017 file had a few impossible ones (over 100
    years), which v2020 corrected; nothing here drops or clips them.
    Raises `LabelFileError` naming the file, the 1-based line and the problem for the first bad row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {path}")
    positions, n_fields = _header_positions(path)
    fields, lines = _read_fields(path, n_fields)
    source = {column: fields[position] for column, position in positions.items()}
    images = source["image"].str.strip()
    _raise_if_any(path, lines, images == "", "empty Image Index")
    _check_unique_images(path, lines, images)
    table = pd.DataFrame(
        {
            "image": images.astype(str),
            "patient_id": _parse_int(path, lines, source["patient_id"], "Patient ID"),
            "follow_up": _parse_int(path, lines, source["follow_up"], "Follow-up #"),
            "age_years": _parse_age(path, lines, source["age"]),
            "sex": pd.Series(_parse_choice(path, lines, source["sex"], "Patient Gender", _SEXES), dtype=str),
            "view": pd.Series(_parse_choice(path, lines, source["view"], "View Position", _VIEWS), dtype=str),
        }
    )
    labels = _parse_labels(path, lines, source["labels"])
    table = pd.concat([table, pd.DataFrame(labels, columns=list(LABELS))], axis=1)
    log.info("read %s: %d images, %d patients", path.name, len(table), table["patient_id"].nunique())
    return table


def label_totals(table: pd.DataFrame) -> pd.Series:
    """Images with each label (one image can have several), indexed in `LABELS` order, like xrv `totals()`."""
    missing = [label for label in LABELS if label not in table.columns]
    if missing:
        raise ValueError(f"table lacks label columns: {', '.join(missing)}")
    totals = table[list(LABELS)].sum(axis=0).astype("int64")
    totals.index.name = "label"
    return totals.rename("positives")
