"""Train / validation / test assignments of the label table: official, patient-random and the guide's split.

- `official`: NIH's patient-wise lists (`train_val_list.txt`, `test_list.txt`; 86,524 and 25,596 images, no
  patient in both). Validation is carved out of train_val by patient.
- `patient_random`: patients shuffled with the seed, then cut into test, validation and train.
- `seed_random`: the guide's image-level 95/5 split, which leaks patients between its parts. It had one
  held-out set, used both to validate and to report, so here "test" means the validation rows.

Every split but `seed_random` is proved patient-disjoint when it is built. Only `seed_random` depends on
the table's row order (`row_order`: `label_file` as read, or `file_name`: sorted by image name, the order
Hugging Face's `imagefolder` gave the guide); the patient-wise splits shuffle sorted patient ids.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from xraycls.findings import LABELS

__all__ = [
    "SplitSettings",
    "labelled_images",
    "PARTS",
    "ROW_ORDERS",
    "SPLIT_NAMES",
    "TEST_LIST",
    "TRAIN_VAL_LIST",
    "SplitAssignment",
    "assert_patient_disjoint",
    "attach_official_split",
    "build_split",
    "read_split_list",
]

log = logging.getLogger(__name__)

SPLIT_NAMES = ("official", "patient_random", "seed_random")
TRAIN_VAL_LIST, TEST_LIST = "train_val_list.txt", "test_list.txt"
PARTS = ("train", "val", "test")
ROW_ORDERS = ("label_file", "file_name")  # the row order `seed_random` permutes
_DEFAULT_FRACTIONS = {  # (val_fraction, test_fraction); None: the split has no such setting
    "official": (0.1, None),
    "patient_random": (0.1, 0.2),
    "seed_random": (0.05, None),
}
# One name ending in .png with no other ".png" inside: two names glued together (a list that lacked its final
# newline, appended to another) must not pass as one image and be blamed as a missing file later.
_IMAGE_NAME = re.compile(r"(?:(?!\.png)[^\s/\\])+\.png", re.IGNORECASE)
_EXAMPLES = 5  # names shown in one message


def read_split_list(path: Path) -> list[str]:
    """Image names, one a line, in file order; blank lines ignored, surrounding spaces stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split list not found: {path}")
    names: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        if not _IMAGE_NAME.fullmatch(name):
            glued = name.lower().count(".png") > 1
            hint = " (two names run together? a list without its final newline)" if glued else ""
            raise ValueError(f"{path}, line {number}: not a PNG image name: {name!r}{hint}")
        if name in seen:
            raise ValueError(
                f"{path}, line {number}: image {name!r} listed again (first on line {seen[name]})"
            )
        seen[name] = number
        names.append(name)
    return names


def _first(names: list[str] | np.ndarray) -> str:
    shown = ", ".join(str(name) for name in list(names)[:_EXAMPLES])
    return shown + (", ..." if len(names) > _EXAMPLES else "")


def attach_official_split(table: pd.DataFrame, root: Path) -> pd.DataFrame:
    """A copy of `table` with `split_official` ("train_val" | "test") from NIH's two lists in `root`.

    The lists may name images the table lacks (a partial label file such as Kaggle's sample), but every
    table image must be in exactly one list.
    """
    root = Path(root)
    for name in (TRAIN_VAL_LIST, TEST_LIST):
        if not (root / name).is_file():
            raise FileNotFoundError(f"official split list {name} not found in {root}")
    train_val = read_split_list(root / TRAIN_VAL_LIST)
    test = read_split_list(root / TEST_LIST)
    in_both = sorted(set(train_val) & set(test))
    if in_both:
        raise ValueError(
            f"{len(in_both)} images are in both {TRAIN_VAL_LIST} and {TEST_LIST}: {_first(in_both)}"
        )
    images = table["image"].to_numpy(dtype=object)
    is_test = pd.Index(test).get_indexer(images) >= 0
    is_train_val = pd.Index(train_val).get_indexer(images) >= 0
    in_neither = images[~is_test & ~is_train_val]
    if len(in_neither):
        raise ValueError(
            f"{len(in_neither)} table images are in neither {TRAIN_VAL_LIST} nor {TEST_LIST} in {root}: "
            f"{_first(in_neither)}"
        )
    result = table.copy()
    result["split_official"] = pd.Series(np.where(is_test, "test", "train_val"), index=table.index, dtype=str)
    return result


@dataclass
class SplitAssignment:
    """Which part ("train" | "val" | "test") each table row belongs to, row-aligned with the table."""

    name: str
    part: np.ndarray  # object array of "train" | "val" | "test", one per table row
    leaked_patients: int  # patients with images in more than one part (0 for patient-wise splits)
    test_is_val: bool  # seed_random: one held-out set, used as both validation and test

    def indices(self, part: str) -> np.ndarray:
        """Row indices (int64, ascending) of one part; "test" gives the val rows when `test_is_val`."""
        if part not in PARTS:
            raise ValueError(f"unknown split part {part!r}; expected one of {', '.join(PARTS)}")
        if part == "test" and self.test_is_val:
            part = "val"
        return np.flatnonzero(self.part == part)

    def summary(self, table: pd.DataFrame) -> dict:
        """Images, patients and per-label positives of each part, as `indices` gives them (JSON-ready)."""
        labels = [label for label in LABELS if label in table.columns]
        rows = {part: self.indices(part) for part in PARTS}
        patients = table["patient_id"].to_numpy()
        return {
            "split": self.name,
            "images": {part: len(index) for part, index in rows.items()},
            "patients": {part: int(len(np.unique(patients[index]))) for part, index in rows.items()},
            "leaked_patients": int(self.leaked_patients),
            "test_is_val": bool(self.test_is_val),
            "positives": {
                part: {label: int(table[label].to_numpy()[index].sum()) for label in labels}
                for part, index in rows.items()
            },
        }


def _patients_in_several_parts(table: pd.DataFrame, part: np.ndarray) -> pd.DataFrame:
    """Distinct (patient, part) pairs of the patients found in more than one part, sorted by patient."""
    pairs = pd.DataFrame({"patient": table["patient_id"].to_numpy(), "part": part}).drop_duplicates()
    several = pairs["patient"].duplicated(keep=False)
    return pairs[several].sort_values(["patient", "part"], kind="stable")


def assert_patient_disjoint(table: pd.DataFrame, assignment: SplitAssignment) -> None:
    """Raise RuntimeError, naming example patients and their parts, if any patient spans two parts."""
    leaked = _patients_in_several_parts(table, assignment.part)
    if len(leaked):
        patients = leaked["patient"].unique()
        examples = ", ".join(
            f"{patient} ({'+'.join(leaked.loc[leaked['patient'] == patient, 'part'])})"
            for patient in patients[:_EXAMPLES]
        )
        raise RuntimeError(
            f"split {assignment.name!r} is not patient-disjoint: {len(patients)} patients in several parts, "
            f"e.g. {examples}"
        )


def _check_fraction(setting: str, value: object) -> None:
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) and 0.0 < value < 1.0):
        raise ValueError(f"{setting} must be in (0, 1), got {value!r}")


def _cut_patients(
    patients: np.ndarray, rng: np.random.Generator, fractions: tuple[float, ...], what: str
) -> list[np.ndarray]:
    """Shuffle distinct patients and cut off ceil(fraction * n) of them for each fraction, in order."""
    order = rng.permutation(np.unique(patients))  # sorted first, so the table's row order does not matter
    # Rounded first so float noise (0.07 * 100 = 7.000000000000001) cannot add a patient.
    sizes = [math.ceil(round(fraction * len(order), 9)) for fraction in fractions]
    if len(order) - sum(sizes) < 1:
        raise ValueError(f"{len(order)} {what} patients are too few to hold out {sizes} and still train")
    cuts = np.cumsum(sizes)
    return np.split(order, cuts)[: len(fractions)]


@dataclass(frozen=True)
class SplitSettings:
    """`build_split`'s arguments: which split, its seed, held-out fractions (None: the split's default) and
    the row order seed_random permutes; `build(table)` applies them."""

    name: str = "official"
    seed: int = 0
    val_fraction: float | None = None
    test_fraction: float | None = None
    row_order: str = "label_file"

    def build(self, table: pd.DataFrame) -> SplitAssignment:
        return build_split(
            table,
            self.name,
            seed=self.seed,
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
            row_order=self.row_order,
        )


def build_split(
    table: pd.DataFrame,
    name: str,
    *,
    seed: int,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    row_order: str = "label_file",
) -> SplitAssignment:
    """Assign every row of `table` (columns `image`, `patient_id`; `split_official` for "official").

    Fractions count patients for the patient-wise splits and images for `seed_random`; held-out sizes are
    ceil(fraction * count). `seed` feeds a local `np.random.default_rng`: same seed, same assignment.
    `row_order` (one of `ROW_ORDERS`) is the order `seed_random` permutes; the result stays row-aligned
    with `table` either way.
    """
    if name not in SPLIT_NAMES:
        raise ValueError(f"unknown split name {name!r}; expected one of {', '.join(SPLIT_NAMES)}")
    if row_order not in ROW_ORDERS:
        raise ValueError(f"unknown row order {row_order!r}; expected one of {', '.join(ROW_ORDERS)}")
    default_val, default_test = _DEFAULT_FRACTIONS[name]
    if test_fraction is not None and default_test is None:
        raise ValueError(
            f"test_fraction must be None for split {name!r} (got {test_fraction!r}): "
            + ("NIH's test list fixes the test set" if name == "official" else "its test set is its val set")
        )
    val_fraction = default_val if val_fraction is None else val_fraction
    test_fraction = default_test if test_fraction is None else test_fraction
    _check_fraction("val_fraction", val_fraction)
    if test_fraction is not None:
        _check_fraction("test_fraction", test_fraction)
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1, got {val_fraction!r} + {test_fraction!r}"
            )
    missing = [column for column in ("image", "patient_id") if column not in table.columns]
    if missing:
        raise ValueError(f"table lacks columns {', '.join(missing)} needed to build split {name!r}")
    if len(table) == 0:
        raise ValueError(f"cannot build split {name!r} of an empty table")

    rng = np.random.default_rng(seed)
    if name == "seed_random":
        return _seed_random(table, rng, val_fraction, row_order)
    patients = table["patient_id"].to_numpy()
    part = np.full(len(table), "train", dtype=object)
    if name == "official":
        if "split_official" not in table.columns:
            raise ValueError("split 'official' needs column split_official: call attach_official_split first")
        official = table["split_official"].to_numpy(dtype=object)
        unknown = sorted(set(official) - {"train_val", "test"})
        if unknown:
            raise ValueError(f"split_official holds values other than train_val/test: {unknown[:_EXAMPLES]}")
        part[official == "test"] = "test"
        (val,) = _cut_patients(patients[official == "train_val"], rng, (val_fraction,), "train_val")
        part[(official == "train_val") & np.isin(patients, val)] = "val"
    else:
        test, val = _cut_patients(patients, rng, (test_fraction, val_fraction), "table")
        part[np.isin(patients, test)] = "test"
        part[np.isin(patients, val)] = "val"
    assignment = SplitAssignment(name=name, part=part, leaked_patients=0, test_is_val=False)
    assert_patient_disjoint(table, assignment)
    log.info("split %s: %s images (train/val/test)", name, [int((part == p).sum()) for p in PARTS])
    return assignment


def _seed_random(
    table: pd.DataFrame, rng: np.random.Generator, val_fraction: float, row_order: str
) -> SplitAssignment:
    """The guide's split by Hugging Face's method: `Dataset.train_test_split(test_size=val_fraction)`.

    datasets' `arrow_dataset.py` takes n_test = ceil(test_size * n), n_train = n - n_test, a permutation
    `generator.permutation(n)`, test = its first n_test indices and train the rest. Here the generator is
    `default_rng(split_seed)`. The guide passed no seed: datasets then seeded it from numpy's global state
    at that moment, unseeded in the guide (`set_seed(1337)` ran later, inside the trainer), so its held-out
    images cannot be recovered. What can match does: the method, the sizes and, with `row_order`
    "file_name", the row order (the guide's rows came from `imagefolder`, sorted by file name).
    """
    n = len(table)
    n_val = math.ceil(val_fraction * n)
    if n - n_val < 1:
        raise ValueError(f"val_fraction {val_fraction!r} of {n} images leaves no training image")
    held_out = rng.permutation(n)[:n_val]  # positions in the permuted order
    if row_order == "file_name":
        # Position i is the i-th image name in sorted order; map it back to its table row.
        held_out = np.argsort(table["image"].to_numpy(dtype=str), kind="stable")[held_out]
    part = np.full(n, "train", dtype=object)
    part[held_out] = "val"
    leaked = _patients_in_several_parts(table, part)["patient"].nunique()
    log.info(
        "split seed_random (%s order): %d train, %d val images; %d patients in both",
        row_order,
        n - n_val,
        n_val,
        leaked,
    )
    return SplitAssignment(name="seed_random", part=part, leaked_patients=leaked, test_is_val=True)


def labelled_images(root: Path) -> pd.DataFrame:
    """ROOT's label file with `split_official` attached, kept to the rows whose PNG is in ROOT/images (a
    partial download is normal: the missing ones are logged). Raises FileNotFoundError when none is there."""
    from xraycls.data.labels import find_label_file, read_label_file

    root = Path(root)
    table = attach_official_split(read_label_file(find_label_file(root)), root)
    image_dir = root / "images"
    present = np.array([(image_dir / name).is_file() for name in table["image"]], dtype=bool)
    if not present.any():
        raise FileNotFoundError(f"none of the {len(table)} labelled images is in {image_dir}")
    if not present.all():
        log.warning(
            "%d of %d labelled images are missing from %s and left out (e.g. %s)",
            int((~present).sum()),
            len(table),
            image_dir,
            table["image"][~present].iloc[0],
        )
    return table[present].reset_index(drop=True)
