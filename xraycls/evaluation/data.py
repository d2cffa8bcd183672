"""The images an evaluation scores: one part of one split, read from the cache (or the PNGs) as training does.

The table, the split and the datasets are the training pipeline's own pieces (`open_cache` or the label
file + `attach_official_split`, `build_split`, `CachedXrayDataset` / `PngXrayDataset` with
`build_eval_transform(input_size)`), so an image reaches the model exactly as it did in training's
evaluation; only the Lightning DataModule around them is left out. Every check runs here, before any
prediction: a cache without the bundle's image size, labels the bundle does not know, a split the data
cannot build, an empty part.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch.utils.data import Dataset

from xraycls.data.cache import cache_array_path, open_cache
from xraycls.data.datasets import CachedXrayDataset, PngXrayDataset
from xraycls.data.splits import PARTS, SPLIT_NAMES, SplitSettings, labelled_images
from xraycls.data.transforms import build_eval_transform
from xraycls.findings import LABELS

__all__ = ["SplitSettings", "EvalSet", "split_settings", "check_labels", "load_eval_set"]

log = logging.getLogger(__name__)


@dataclass
class EvalSet:
    """One part of one split: the dataset (uint8 [input, input] images, float32 [15] labels) and its ids."""

    dataset: Dataset
    images: np.ndarray  # file names, row-aligned with the dataset
    patients: np.ndarray  # patient ids
    labels: np.ndarray  # float32 [N, 15], LABELS order
    split: SplitSettings
    part: str
    source: str  # "cache DIR" or "png DIR"
    notes: list[str] = field(default_factory=list)  # e.g. seed_random's test part is its val part


def split_settings(
    bundle_config: dict[str, Any],
    split: str | None = None,
    seed: int | None = None,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
) -> SplitSettings:
    """The split to score: what was asked, else what the bundle's run trained on (``extra.data``), else
    "official" with seed 0. A field not asked for is taken from the bundle only when the split is its own."""
    trained = (bundle_config.get("extra") or {}).get("data") or {}
    name = split or trained.get("split") or "official"
    if name not in SPLIT_NAMES:
        raise ValueError(f"--split {name!r}: expected one of {', '.join(SPLIT_NAMES)}")
    same = trained.get("split") == name
    return SplitSettings(
        name=name,
        seed=int(seed if seed is not None else (trained.get("split_seed", 0) if same else 0)),
        val_fraction=val_fraction
        if val_fraction is not None
        else (trained.get("val_fraction") if same else None),
        test_fraction=(
            test_fraction if test_fraction is not None else (trained.get("test_fraction") if same else None)
        ),
        # the split is rebuilt as the run built it: seed_reproduction permutes the images in file-name order
        row_order=str(trained.get("split_row_order") or "label_file") if same else "label_file",
    )


def check_labels(bundle_labels: list[str], table_columns: list[str], where: str) -> None:
    """ValueError unless the data has a 0/1 column for every output of the model, under the same name."""
    missing = [name for name in bundle_labels if name not in table_columns]
    if missing or list(bundle_labels) != list(LABELS):
        raise ValueError(
            f"{where}: the model's labels {list(bundle_labels)} and the data's label columns do not match "
            f"(missing in the data: {missing}; xraycls LABELS: {list(LABELS)})"
        )


def _cache_sizes(cache_dir: Path) -> list[int]:
    sizes = []
    for path in cache_dir.glob("images_u8_*.npy"):
        suffix = path.stem.rpartition("_")[2]
        if suffix.isdigit():
            sizes.append(int(suffix))
    return sorted(sizes)


def _open_cache_table(cache_dir: Path, size: int) -> pd.DataFrame:
    if not cache_dir.is_dir():
        raise FileNotFoundError(f"--cache {cache_dir}: no such folder")
    if not cache_array_path(cache_dir, size).is_file():
        sizes = _cache_sizes(cache_dir)
        if sizes:
            raise ValueError(
                f"--cache {cache_dir} holds {', '.join(f'{s}px' for s in sizes)} images, but the model was "
                f"trained on {size}px (preprocessing.image_size): run `xraycls prepare --root <NIH folder> "
                f"--cache {cache_dir} --size {size}`"
            )
    _array, index = open_cache(cache_dir, size)
    return index.reset_index(drop=True)


def _png_table(root: Path) -> pd.DataFrame:
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root}: no such folder")
    try:
        return labelled_images(root)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--root {root}: {error}") from None


def load_eval_set(
    preprocessing: dict[str, Any],
    bundle_labels: list[str],
    *,
    cache_dir: Path | None = None,
    root: Path | None = None,
    split: SplitSettings = SplitSettings(),  # noqa: B008 (frozen dataclass: an immutable default)
    part: str = "test",
) -> EvalSet:
    """The `part` of `split` from `cache_dir` (or the PNGs under `root`), at the bundle's image size.

    Raises FileNotFoundError / ValueError, naming the folder or setting, for each problem in the module doc.
    """
    if (cache_dir is None) == (root is None):
        raise ValueError("give exactly one of --cache DIR or --root DIR")
    if part not in PARTS:
        raise ValueError(f"--part {part!r}: expected one of {', '.join(PARTS)}")
    size, input_size = int(preprocessing["image_size"]), int(preprocessing["input_size"])
    if cache_dir is not None:
        table, source = _open_cache_table(Path(cache_dir), size), f"cache {cache_dir}"
    else:
        table, source = _png_table(Path(root)), f"png {root}"
    check_labels(bundle_labels, list(table.columns), source)
    try:
        assignment = split.build(table)
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"split {split.name!r} cannot be built from the {source}: {err}") from err
    rows = np.asarray(assignment.indices(part), dtype=np.int64)
    if rows.size == 0:
        raise ValueError(f"part {part!r} of split {split.name!r} in the {source} holds no images")
    notes = []
    if part == "test" and assignment.test_is_val:
        notes.append(f"split {split.name!r} has one held-out set: its test part is its validation part")
    if assignment.leaked_patients:
        notes.append(f"split {split.name!r} leaks {assignment.leaked_patients} patients between its parts")
    labels = table[list(LABELS)].to_numpy(dtype=np.float32)[rows]
    transform = build_eval_transform(input_size)
    names = table["image"].to_numpy(dtype=str)[rows]
    if cache_dir is not None:
        dataset: Dataset = CachedXrayDataset(
            cache_array_path(Path(cache_dir), size), size, rows, labels, transform
        )
    else:  # a corrupt file stops the job, naming it: replacing it would score another image twice
        dataset = PngXrayDataset(
            Path(root) / "images", list(names), labels, size, transform, skip_corrupt=False
        )
    patients = table["patient_id"].to_numpy()[rows]
    return EvalSet(dataset, names, patients, labels, split, part, source, notes)
