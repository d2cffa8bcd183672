"""Synthetic data in the exact NIH ChestX-ray14 layout, with a planted, learnable, local signal per finding.

`make_synthetic_nih(out, n)` writes what a real download holds, so every later step runs unchanged on it:

- `images/PPPPPPPP_FFF.png`: n 8-bit gray `size` x `size` PNGs, patient P's follow-up F (several per patient,
  `images_per_patient` drawn uniformly);
- `Data_Entry_2017_v2020.csv`: the v2020 header and its 11 fields per row (labels joined by `|` in
  alphabetical order, `No Finding` when none; follow-up, age in years, M/F, PA/AP, an original width and
  height, pixel spacing), LF line ends, in image-name order;
- `train_val_list.txt` / `test_list.txt`: a patient-wise split with about 22.8% of images in test (the
  official 25,596 / 112,120), names sorted, no final newline, like NIH's files.

The rule of the images: a chest-like background (two dark lung fields and a bright mediastinum, blurred,
plus smooth low-frequency and fine pixel noise and a per-image gain and offset), and for each positive
finding a bright disc (brighter than any anatomy) in that finding's own cell of a 4 x 4 grid (cells in
`FINDINGS` order, row by row; the last two cells never hold a mark), its centre jittered by a few pixels.
`planted_signal_boxes` gives each finding's box: every pixel its mark can touch. A `No Finding` image
carries no mark.

Labels: finding f is positive on exactly max(round(p_f n), ceil(min_prevalence n)) images chosen at random,
independently of the other findings (so multi-label images occur). `prevalence="nih"` uses the real
per-finding prevalences; a dict gives them directly (findings it omits get 0).

Determinism: everything comes from `seed` through local generators (one for the table, one per image, keyed
by the image's position), so the same arguments give byte-identical files whatever `workers` is.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
from pathlib import Path

import cv2
import numpy as np

from xraycls.findings import FINDINGS, LABELS, NO_FINDING

__all__ = ["NIH_PREVALENCE", "LABEL_FILE_NAME", "make_synthetic_nih", "planted_signal_boxes"]

log = logging.getLogger(__name__)

# Images with each finding / all 112,120 images, counted in NIH's Data_Entry_2017_v2020.csv (the complete
# v2020 label file, ../shared/nih/Data_Entry_2017_v2020.csv.gz), labels split on "|".
NIH_PREVALENCE: dict[str, float] = {
    "Atelectasis": 11559 / 112120,
    "Cardiomegaly": 2776 / 112120,
    "Effusion": 13317 / 112120,
    "Infiltration": 19894 / 112120,
    "Mass": 5782 / 112120,
    "Nodule": 6331 / 112120,
    "Pneumonia": 1431 / 112120,
    "Pneumothorax": 5302 / 112120,
    "Consolidation": 4667 / 112120,
    "Edema": 2303 / 112120,
    "Emphysema": 2516 / 112120,
    "Fibrosis": 1686 / 112120,
    "Pleural_Thickening": 3385 / 112120,
    "Hernia": 227 / 112120,
}
LABEL_FILE_NAME = "Data_Entry_2017_v2020.csv"
_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
_TEST_FRACTION = 25596 / 112120  # official test_list.txt / all images
# Common original sizes and pixel spacings of the real file, spacings spelled exactly as NIH wrote them.
_ORIGINAL_SIZES = ((2500, 2048), (2992, 2991), (3056, 2544), (2682, 2749), (2048, 2500), (2544, 3056))
_SPACINGS = ("0.14300000000000002", "0.168", "0.139", "0.171", "0.19431099999999998")
_SPACING_WEIGHTS = (0.36, 0.32, 0.18, 0.09, 0.05)
_SPLIT_CANDIDATES = 32
_GRID = 4  # 4 x 4 cells; the 14 findings take the first 14
_MIN_SIZE = 32
_META_STREAM, _IMAGE_STREAM = 0, 1  # separate seed streams for the table and the pixels


def _geometry(size: int) -> tuple[int, int, list[tuple[int, int]]]:
    """(disc radius, jitter, cell centres in FINDINGS order) for a `size` px image."""
    margin = round(size * 0.04)
    cell = (size - 2 * margin) / _GRID
    radius = max(1, round(cell * 0.22))
    jitter = int(cell * 0.12)
    centres = [
        (round(margin + (i % _GRID + 0.5) * cell), round(margin + (i // _GRID + 0.5) * cell))
        for i in range(len(FINDINGS))
    ]
    return radius, jitter, centres


def planted_signal_boxes(size: int) -> dict[str, tuple[int, int, int, int]]:
    """Finding -> (x0, y0, x1, y1): half-open pixel box of every pixel its mark can touch, at `size` px."""
    radius, jitter, centres = _geometry(size)
    extent = radius + jitter
    return {
        finding: (cx - extent, cy - extent, cx + extent + 1, cy + extent + 1)
        for finding, (cx, cy) in zip(FINDINGS, centres, strict=True)
    }


def _anatomy(size: int) -> np.ndarray:
    """The shared chest-like background, float32 [size, size]: body, two dark lungs, bright mediastinum."""
    image = np.full((size, size), 25.0, dtype=np.float32)
    s = size

    def ellipse(centre: tuple[float, float], axes: tuple[float, float], value: float) -> None:
        centre_px = (round(centre[0] * s), round(centre[1] * s))
        axes_px = (max(1, round(axes[0] * s)), max(1, round(axes[1] * s)))
        cv2.ellipse(image, centre_px, axes_px, 0, 0, 360, value, thickness=-1)

    ellipse((0.5, 0.55), (0.46, 0.5), 120.0)  # body
    ellipse((0.3, 0.47), (0.16, 0.3), 55.0)  # right lung (image left)
    ellipse((0.7, 0.47), (0.16, 0.3), 55.0)  # left lung
    ellipse((0.5, 0.5), (0.08, 0.38), 175.0)  # mediastinum and spine
    ellipse((0.56, 0.66), (0.12, 0.1), 165.0)  # heart shadow
    return cv2.GaussianBlur(image, (0, 0), sigmaX=max(0.5, size / 40))


def _render(size: int, positives: np.ndarray, seed: int, index: int, anatomy: np.ndarray) -> np.ndarray:
    """One uint8 [size, size] image: background, noise, and a mark for each finding index in `positives`."""
    rng = np.random.default_rng([seed, _IMAGE_STREAM, index])
    smooth = rng.normal(0.0, 1.0, size=(6, 6)).astype(np.float32)
    image = anatomy + 12.0 * cv2.resize(smooth, (size, size), interpolation=cv2.INTER_CUBIC)
    radius, jitter, centres = _geometry(size)
    offsets = rng.integers(-jitter, jitter + 1, size=(len(FINDINGS), 2))
    for finding in positives:
        cx, cy = centres[finding]
        centre = (int(cx + offsets[finding, 0]), int(cy + offsets[finding, 1]))
        cv2.circle(image, centre, radius, 250.0, thickness=-1)
    image += rng.normal(0.0, 5.0, size=(size, size)).astype(np.float32)
    image = image * rng.uniform(0.9, 1.1) + rng.uniform(-8.0, 8.0)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _write_images(job: tuple[Path, list[str], list[np.ndarray], int, int, list[int]]) -> int:
    """Render and write one batch of images (a Pool task; top-level so that spawn can pickle it)."""
    images_dir, names, positives, size, seed, indices = job
    anatomy = _anatomy(size)
    for name, found, index in zip(names, positives, indices, strict=True):
        ok, encoded = cv2.imencode(".png", _render(size, found, seed, index, anatomy))
        if not ok:
            raise RuntimeError(f"PNG encoding failed for {images_dir / name}")
        (images_dir / name).write_bytes(encoded.tobytes())
    return len(names)


def _prevalences(prevalence: str | dict[str, float], min_prevalence: float) -> dict[str, float]:
    if isinstance(prevalence, str):
        if prevalence != "nih":
            raise ValueError(f"prevalence must be 'nih' or a dict of finding -> fraction, got {prevalence!r}")
        chosen = dict(NIH_PREVALENCE)
    else:
        unknown = sorted(set(prevalence) - set(FINDINGS))
        if unknown:
            raise ValueError(f"prevalence names unknown findings {unknown}; known: {', '.join(FINDINGS)}")
        chosen = {finding: float(prevalence.get(finding, 0.0)) for finding in FINDINGS}
    for finding, value in chosen.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"prevalence of {finding} must be within [0, 1], got {value}")
    if not 0.0 <= min_prevalence <= 1.0:
        raise ValueError(f"min_prevalence must be within [0, 1], got {min_prevalence}")
    return {finding: max(value, min_prevalence) for finding, value in chosen.items()}


def _check_arguments(n: int, size: int, images_per_patient: tuple[int, int], workers: int) -> None:
    if n < 1:
        raise ValueError(f"n must be at least 1 image, got {n}")
    if size < _MIN_SIZE:
        raise ValueError(f"size must be at least {_MIN_SIZE} px for the planted marks to fit, got {size}")
    low, high = images_per_patient
    if not 1 <= low <= high:
        raise ValueError(
            f"images_per_patient must be (low, high) with 1 <= low <= high, got {images_per_patient}"
        )
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")


def _table(n: int, prevalence: dict[str, float], min_prevalence: float, images_per_patient, rng):
    """Patients, follow-ups and the label matrix uint8 [n, 14] (findings only)."""
    low, high = images_per_patient
    patient_of, follow_up = [], []
    patient = 0
    while len(patient_of) < n:
        patient += 1
        count = min(int(rng.integers(low, high + 1)), n - len(patient_of))
        patient_of += [patient] * count
        follow_up += list(range(count))
    findings = np.zeros((n, len(FINDINGS)), dtype=np.uint8)
    for column, finding in enumerate(FINDINGS):
        # Exact counts, so min_prevalence holds for the data and not just in expectation.
        count = max(round(prevalence[finding] * n), math.ceil(min_prevalence * n - 1e-9))
        findings[rng.choice(n, size=min(count, n), replace=False), column] = 1
    return np.array(patient_of), np.array(follow_up), findings


def _label_rows(names, patient_of, follow_up, findings, rng) -> list[str]:
    patients = int(patient_of.max())
    base_age = np.clip(np.rint(rng.normal(47.0, 17.0, size=patients + 1)), 1, 90).astype(int)
    sex = np.where(rng.random(patients + 1) < 0.565, "M", "F")  # 56.5% men in the real file
    view = np.where(rng.random(len(names)) < 0.6, "PA", "AP")  # 60% PA in the real file
    sizes = rng.integers(0, len(_ORIGINAL_SIZES), size=len(names))
    spacings = rng.choice(len(_SPACINGS), size=len(names), p=_SPACING_WEIGHTS)
    rows = []
    for i, name in enumerate(names):
        found = sorted(FINDINGS[j] for j in np.flatnonzero(findings[i]))
        labels = "|".join(found) if found else NO_FINDING
        patient = int(patient_of[i])
        age = base_age[patient] + int(follow_up[i]) // 4  # older on later follow-ups
        width, height = _ORIGINAL_SIZES[sizes[i]]
        spacing = _SPACINGS[spacings[i]]
        rows.append(
            f"{name},{labels},{follow_up[i]},{patient},{age},{sex[patient]},{view[i]},"
            f"{width},{height},{spacing},{spacing}"
        )
    return rows


def _split(patient_of: np.ndarray, findings: np.ndarray, rng) -> np.ndarray:
    """Boolean [n]: True for test images. Whole patients go to test until ~22.8% of the images; of
    `_SPLIT_CANDIDATES` random draws, the one whose per-finding test shares stay closest to that fraction
    wins, so that even a rare finding has positives on both sides."""
    patients, counts = np.unique(patient_of, return_counts=True)
    target = round(_TEST_FRACTION * len(patient_of))
    positives = findings.sum(axis=0).astype(float)
    best, best_error = None, math.inf
    for _ in range(_SPLIT_CANDIDATES):
        order = rng.permutation(len(patients))
        taken = np.cumsum(counts[order])
        # Patients join test while the images already taken stay below the target.
        chosen = order[: int(np.searchsorted(taken, target, side="left")) + (1 if target else 0)]
        is_test = np.isin(patient_of, patients[chosen])
        shares = findings[is_test].sum(axis=0) / np.maximum(positives, 1.0)
        error = float(np.abs(shares - _TEST_FRACTION)[positives > 0].max(initial=0.0))
        if error < best_error:
            best, best_error = is_test, error
    return best


def _check_output(images_dir: Path, names: list[str]) -> None:
    """Refuse to mix datasets: existing PNGs must all be names this call will overwrite."""
    if not images_dir.is_dir():
        return
    foreign = sorted({p.name for p in images_dir.glob("*.png")} - set(names))
    if foreign:
        raise ValueError(
            f"{images_dir} already holds {len(foreign)} PNGs this dataset would not overwrite "
            f"(e.g. {foreign[0]}); choose a new output folder or delete it"
        )


def make_synthetic_nih(
    out: Path,
    n: int,
    *,
    size: int = 256,
    seed: int = 0,
    prevalence: str | dict[str, float] = "nih",
    min_prevalence: float = 0.0,
    images_per_patient: tuple[int, int] = (1, 6),
    workers: int = 1,
) -> dict:
    """Write a synthetic NIH-format dataset of `n` images into `out` (module docstring); return a summary.

    Summary: `images`, `patients`, `size`, `seed`, `label_file`, `label_counts` (images per label, all 15),
    `splits` ({"train_val"|"test": {"images", "patients", "label_counts"}}), `prevalence` (the targets used).
    """
    _check_arguments(n, size, images_per_patient, workers)
    targets = _prevalences(prevalence, min_prevalence)
    out = Path(out)
    rng = np.random.default_rng([seed, _META_STREAM])
    patient_of, follow_up, findings = _table(n, targets, min_prevalence, images_per_patient, rng)
    names = [f"{p:08d}_{f:03d}.png" for p, f in zip(patient_of, follow_up, strict=True)]
    images_dir = out / "images"
    _check_output(images_dir, names)
    rows = _label_rows(names, patient_of, follow_up, findings, rng)
    is_test = _split(patient_of, findings, rng)

    images_dir.mkdir(parents=True, exist_ok=True)
    positives = [np.flatnonzero(row) for row in findings]
    batch = max(1, math.ceil(n / (workers * 4)))
    jobs = []
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        jobs.append(
            (images_dir, names[start:stop], positives[start:stop], size, seed, list(range(start, stop)))
        )
    if workers == 1:
        for job in jobs:
            _write_images(job)
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_images, jobs):
                pass
    (out / LABEL_FILE_NAME).write_text(_HEADER + "\n" + "".join(row + "\n" for row in rows), newline="\n")
    for list_name, in_test in (("train_val_list.txt", False), ("test_list.txt", True)):
        listed = [name for name, test in zip(names, is_test, strict=True) if test == in_test]
        (out / list_name).write_text("\n".join(listed))

    summary = _summary(out, n, size, seed, patient_of, findings, is_test, targets)
    log.info("wrote %d synthetic images of %d patients to %s", n, summary["patients"], out)
    return summary


def _label_counts(findings: np.ndarray) -> dict[str, int]:
    counts = {finding: int(findings[:, j].sum()) for j, finding in enumerate(FINDINGS)}
    counts[NO_FINDING] = int((findings.sum(axis=1) == 0).sum())
    return {label: counts[label] for label in LABELS}


def _summary(out, n, size, seed, patient_of, findings, is_test, targets) -> dict:
    splits = {
        name: {
            "images": int(mask.sum()),
            "patients": int(np.unique(patient_of[mask]).size),
            "label_counts": _label_counts(findings[mask]),
        }
        for name, mask in (("train_val", ~is_test), ("test", is_test))
    }
    return {
        "out": str(out),
        "label_file": LABEL_FILE_NAME,
        "images": n,
        "patients": int(np.unique(patient_of).size),
        "size": size,
        "seed": seed,
        "label_counts": _label_counts(findings),
        "splits": splits,
        "prevalence": {finding: round(value, 6) for finding, value in targets.items()},
    }
