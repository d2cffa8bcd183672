"""`xraycls prepare`: decode every labelled PNG once into a uint8 [N, size, size] array, resumably.

Inputs in `root`: `images/*.png`, a label file (any variant `find_label_file` accepts, or the one named by
`label_file`) and NIH's two split lists. Outputs in `cache_dir`:

- `images_u8_{size}.npy`: a standard `.npy` file (what `numpy.lib.format.open_memmap` writes), uint8
  [N, size, size], decoded by `xraycls.data.images.load_xray`; open it with `np.load(..., mmap_mode="r")`;
- `index.csv`: one row per array row, same order: `INDEX_COLUMNS`;
- `prepare_report.json`: `ok`, `corrupt` [{"image", "reason"}], `missing` {"count", "first"} (label rows
  without an image file: a partial download is normal), `size`, `seconds`, `images_per_s`, `workers`,
  `label_file`, and `arrays` {size: {rows, inputs, ...}}: the sizes made in this folder, each with the
  fingerprint of its inputs (one folder holds several sizes; one made from other inputs is stale).

Rows are the label file's rows whose image exists, in label-file order, minus corrupt images (skipped and
reported, never fatal). Work is done in chunks of `chunk_size` images by a pool of processes; each finished
chunk is saved atomically in `cache_dir/.partial_{size}/`, so a rerun after an interruption decodes only the
unfinished chunks. The chunks are then streamed in order into the array, so memory stays bounded by
chunk_size x workers images whatever N is, and the result is byte-identical to an uninterrupted run. The
array and the index are replaced atomically and the report is written last: it is the completion mark.
Disk: the chunks and the final array coexist while assembling, so about twice the array's size is needed
(checked before decoding). A run that stops before any chunk is finished (refused for disk space, say)
leaves no chunk folder behind, nor the cache folder if it made it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from xraycls.data.images import ImageDecodeError, load_xray
from xraycls.data.labels import find_label_file, read_label_file
from xraycls.data.splits import TEST_LIST, TRAIN_VAL_LIST, attach_official_split
from xraycls.files import atomic_path, check_output_dir, write_bytes
from xraycls.findings import LABELS

__all__ = [
    "INDEX_COLUMNS",
    "INDEX_NAME",
    "REPORT_NAME",
    "cache_array_path",
    "cache_is_complete",
    "open_cache",
    "prepare_cache",
]

log = logging.getLogger(__name__)

INDEX_NAME = "index.csv"
REPORT_NAME = "prepare_report.json"
_META_COLUMNS = {"follow_up": "int64", "age_years": "int64", "sex": str, "view": str}
INDEX_COLUMNS: tuple[str, ...] = ("image", "patient_id", "split_official", *LABELS, *_META_COLUMNS)
_INDEX_DTYPES = {"image": str, "patient_id": "int64", "split_official": str, **dict.fromkeys(LABELS, "uint8")}
_INDEX_DTYPES.update(_META_COLUMNS)
_VERSION = 1  # bump when the decoding rule or the file layout changes: old caches become stale
_FIRST_MISSING = 20  # missing names listed in the report


def cache_array_path(cache_dir: Path, size: int) -> Path:
    """Where the [N, size, size] uint8 array of a cache lives."""
    return Path(cache_dir) / f"images_u8_{size}.npy"


@dataclass
class _Inputs:
    label_file: Path
    table: pd.DataFrame  # label rows whose image exists, label-file order, with split_official
    missing: list[str]  # label rows without an image file
    unlabelled: int  # PNGs in images/ that no label row names
    fingerprint: str  # of the label file, the split lists and each present image's name, size and mtime


def _file_digest(path: Path, digest) -> None:
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


def _scan_inputs(root: Path, label_file: Path | None = None) -> _Inputs:
    """Read and check everything `prepare_cache` needs, before any work; raise on what is absent."""
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise FileNotFoundError(f"no images folder at {images_dir} (expected ROOT/images/*.png)")
    if label_file is None:
        try:
            label_file = find_label_file(root)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"{error}; for a file of another name: xraycls prepare --labels FILE"
            ) from None
    elif not label_file.is_file():
        raise FileNotFoundError(f"label file {label_file}: no such file")
    table = attach_official_split(read_label_file(label_file), root)
    on_disk: dict[str, os.stat_result] = {}
    with os.scandir(images_dir) as entries:
        for entry in entries:
            if entry.name.lower().endswith(".png") and entry.is_file():  # follows symlinks
                on_disk[entry.name] = entry.stat()
    present = table["image"].isin(on_disk).to_numpy()
    if not present.any():
        raise FileNotFoundError(f"none of the {len(table)} images named in {label_file} is in {images_dir}")
    digest = hashlib.sha256(f"xraycls-cache-v{_VERSION}\n{label_file.name}\n".encode())
    for path in (label_file, root / TRAIN_VAL_LIST, root / TEST_LIST):
        _file_digest(path, digest)
    kept = table[present].reset_index(drop=True)
    for name in kept["image"]:
        stat = on_disk[name]
        digest.update(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return _Inputs(
        label_file=label_file,
        table=kept,
        missing=table.loc[~present, "image"].tolist(),
        unlabelled=len(set(on_disk) - set(table["image"])),
        fingerprint=digest.hexdigest(),
    )


def _read_report(cache_dir: Path) -> dict | None:
    try:
        report = json.loads((Path(cache_dir) / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def _array_shape(path: Path) -> tuple[int, ...] | None:
    """Shape from the .npy header (no data read), None if absent or not a uint8 .npy."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    except (OSError, ValueError):
        return None
    return shape if dtype == np.uint8 else None


def _staleness(cache_dir: Path, size: int, report: dict | None, fingerprint: str | None = None) -> str | None:
    """Why the cache of `size` is not complete and current (None if it is); `fingerprint`: current inputs."""
    if report is None:
        return f"{REPORT_NAME} is missing or unreadable (prepare did not finish)"
    entry = report.get("arrays", {}).get(str(size))
    if report.get("version") != _VERSION or entry is None:
        return f"{REPORT_NAME} records no finished {size}px array (of this cache format)"
    if entry.get("inputs") != report.get("inputs") or (fingerprint and entry["inputs"] != fingerprint):
        return f"the {size}px array was made from other inputs than the current ones"
    index_path = Path(cache_dir) / INDEX_NAME
    if not index_path.is_file() or hashlib.sha256(index_path.read_bytes()).hexdigest() != report.get("index"):
        return f"{INDEX_NAME} is missing or was changed after prepare"
    shape = _array_shape(cache_array_path(cache_dir, size))
    if shape != (entry.get("rows"), size, size):
        return (
            f"{cache_array_path(cache_dir, size).name} is {shape}, not ({entry.get('rows')}, {size}, {size})"
        )
    return None


def cache_is_complete(cache_dir: Path, size: int) -> bool:
    """True if `cache_dir` holds a finished, self-consistent cache of `size` px (no inputs are read)."""
    return _staleness(Path(cache_dir), size, _read_report(Path(cache_dir))) is None


def _init_worker() -> None:
    import cv2

    # One process per core already: OpenCV's own threads would only oversubscribe the cores.
    cv2.setNumThreads(1)


def _decode_chunk(job: tuple[str, list[str], int, str, int]) -> tuple[int, int]:
    """Decode one chunk into `chunk_NNNNNN.npy` + `.json` (ok names, corrupt reasons); the json, written
    last, marks the chunk finished. Returns (chunk number, images attempted). Top-level for spawn."""
    images_dir, names, size, partial, number = job
    images, ok, corrupt = [], [], []
    for name in names:
        try:
            images.append(load_xray(Path(images_dir) / name, size))
            ok.append(name)
        except ImageDecodeError as err:
            corrupt.append({"image": name, "reason": err.problem})
        except OSError as err:
            corrupt.append({"image": name, "reason": f"unreadable file ({err.strerror or err})"})
    array = np.stack(images) if images else np.zeros((0, size, size), dtype=np.uint8)
    stem = Path(partial) / f"chunk_{number:06d}"
    with atomic_path(Path(f"{stem}.npy")) as tmp, open(tmp, "xb") as handle:
        np.save(handle, array, allow_pickle=False)
    write_bytes(Path(f"{stem}.json"), json.dumps({"ok": ok, "corrupt": corrupt}).encode())
    return number, len(names)


def _open_partial(cache_dir: Path, size: int, chunk_size: int, inputs: str) -> Path:
    """The chunk folder, kept from an interrupted run only if it was for the same inputs and settings."""
    partial = cache_dir / f".partial_{size}"
    stamp = json.dumps({"version": _VERSION, "inputs": inputs, "size": size, "chunk_size": chunk_size})
    marker = partial / "fingerprint.json"
    if partial.is_dir() and not (marker.is_file() and marker.read_text() == stamp):
        log.info("%s is from other inputs or settings: starting the %dpx cache over", partial, size)
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        write_bytes(marker, stamp.encode())
    return partial


def _run_chunks(jobs: list, workers: int, bar: tqdm) -> None:
    if workers == 1:
        for job in jobs:
            bar.update(_decode_chunk(job)[1])
        return
    # spawn: no fork of a parent that may hold torch threads or open CUDA state.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker) as pool:
        for _number, attempted in pool.imap_unordered(_decode_chunk, jobs):
            bar.update(attempted)


def _assemble(partial: Path, chunks: int, size: int, target: Path) -> tuple[list[str], list[dict]]:
    """Stream the chunk arrays in order into `target` (.npy); return ok names and corrupt entries."""
    results = [json.loads((partial / f"chunk_{i:06d}.json").read_text()) for i in range(chunks)]
    ok = [name for result in results for name in result["ok"]]
    corrupt = [entry for result in results for entry in result["corrupt"]]
    if not ok:
        reasons = "; ".join(f"{c['image']}: {c['reason']}" for c in corrupt[:3])
        raise ValueError(f"all {len(corrupt)} images are corrupt, nothing to cache (e.g. {reasons})")
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
    with atomic_path(target) as tmp, open(tmp, "xb") as handle:
        np.lib.format.write_array_header_1_0(handle, {**header, "shape": (len(ok), size, size)})
        for i, result in enumerate(results):
            array = np.load(partial / f"chunk_{i:06d}.npy", allow_pickle=False)
            if array.shape != (len(result["ok"]), size, size) or array.dtype != np.uint8:
                raise ValueError(f"chunk {partial / f'chunk_{i:06d}.npy'} is damaged; delete {partial}")
            handle.write(array.tobytes())
    return ok, corrupt


def _drop_unstarted(partial: Path, made_folder: Path | None) -> None:
    """Remove a chunk folder with no finished chunk (nothing to resume), and the cache folder when this
    run made it and it is left empty."""
    if partial.is_dir() and not any(partial.glob("chunk_*.json")):
        shutil.rmtree(partial, ignore_errors=True)
    if made_folder is not None and made_folder.is_dir() and not any(made_folder.iterdir()):
        made_folder.rmdir()


def _check_settings(size: int, chunk_size: int, workers: int | None) -> None:
    settings = {"size": size, "chunk_size": chunk_size, **({} if workers is None else {"workers": workers})}
    for name, value in settings.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive whole number, got {value!r}")


def _check_disk(cache_dir: Path, need: int) -> None:
    free = shutil.disk_usage(cache_dir).free
    if free < need:
        raise ValueError(
            f"not enough free disk space in {cache_dir}: the cache needs about {need / 1e9:.2f} GB more "
            f"(chunks, then the array), {free / 1e9:.2f} GB are free"
        )


def _decode(
    inputs: _Inputs,
    root: Path,
    partial: Path,
    size: int,
    chunk_size: int,
    workers: int | None,
    progress: bool,
) -> tuple[int, int, int, int]:
    """Decode the chunks not finished yet; return (chunks, chunks reused, images decoded now, processes)."""
    names = inputs.table["image"].tolist()
    jobs = [
        (str(root / "images"), names[i : i + chunk_size], size, str(partial), number)
        for number, i in enumerate(range(0, len(names), chunk_size))
    ]
    todo = [job for job in jobs if not (partial / f"chunk_{job[4]:06d}.json").is_file()]
    if len(todo) < len(jobs):
        log.info("resuming: %d of %d chunks already decoded in %s", len(jobs) - len(todo), len(jobs), partial)
    pool_size = max(1, min(workers or len(os.sched_getaffinity(0)), len(todo)))
    decoded = sum(len(job[1]) for job in todo)
    _check_disk(partial.parent, (decoded + len(names)) * size * size)
    desc = f"prepare {size}px"
    with tqdm(
        total=len(names), initial=len(names) - decoded, unit="img", desc=desc, disable=not progress
    ) as bar:
        _run_chunks(todo, pool_size, bar)
    return len(jobs), len(jobs) - len(todo), decoded, pool_size


def prepare_cache(
    root: Path,
    cache_dir: Path,
    *,
    size: int = 256,
    workers: int | None = None,
    chunk_size: int = 256,
    progress: bool = True,
    label_file: Path | None = None,
) -> dict:
    """Build (or resume, or find current) the `size` px cache of `root` in `cache_dir`; return the report.

    `workers`: decoding processes (default: every core this process may use). `label_file`: the label file
    to read (default: the first known name in `root`, `find_label_file`). A cache already complete for the
    same inputs is left as is and its report returned with `reused: true` (and `decoded: 0`); a cache to
    write needs a writable `cache_dir` (ValueError before any work otherwise).
    """
    start = time.perf_counter()
    _check_settings(size, chunk_size, workers)
    root, cache_dir = Path(root), Path(cache_dir)
    inputs = _scan_inputs(root, None if label_file is None else Path(label_file))
    previous = _read_report(cache_dir)
    if _staleness(cache_dir, size, previous, inputs.fingerprint) is None:
        entry = previous["arrays"][str(size)]
        log.info("%dpx cache in %s is complete for these inputs: nothing to do", size, cache_dir)
        return {**previous, **entry, "size": size, "ok": entry["rows"], "reused": True, "decoded": 0}

    check_output_dir(cache_dir, "cache folder")
    made_folder = not cache_dir.exists()
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = _open_partial(cache_dir, size, chunk_size, inputs.fingerprint)
    try:
        chunks, reused, decoded, pool_size = _decode(
            inputs, root, partial, size, chunk_size, workers, progress
        )
    except BaseException:
        _drop_unstarted(partial, cache_dir if made_folder else None)
        raise

    # From here on the old report must not vouch for this size: its array and the index are replaced.
    arrays = {k: v for k, v in (previous or {}).get("arrays", {}).items() if k != str(size)}
    if previous:
        write_bytes(cache_dir / REPORT_NAME, json.dumps({**previous, "arrays": arrays}, indent=2).encode())
    ok, corrupt = _assemble(partial, chunks, size, cache_array_path(cache_dir, size))
    bad = {entry["image"] for entry in corrupt}
    index = inputs.table[~inputs.table["image"].isin(bad)]
    if index["image"].tolist() != ok:
        raise RuntimeError(f"internal error: decoded rows do not follow the label file order in {partial}")
    index_bytes = index.loc[:, list(INDEX_COLUMNS)].to_csv(index=False, lineterminator="\n").encode()
    write_bytes(cache_dir / INDEX_NAME, index_bytes)

    seconds = time.perf_counter() - start
    rate = round(decoded / seconds, 1) if seconds > 0 else 0.0
    # Other sizes made from other inputs stay listed: open_cache then says why they are stale.
    arrays[str(size)] = {
        "rows": len(ok),
        "inputs": inputs.fingerprint,
        "seconds": round(seconds, 3),
        "images_per_s": rate,
    }
    report = {
        "ok": len(ok),
        "corrupt": corrupt,
        "missing": {"count": len(inputs.missing), "first": inputs.missing[:_FIRST_MISSING]},
        "unlabelled_images": inputs.unlabelled,
        "size": size,
        "seconds": round(seconds, 3),
        "images_per_s": rate,
        "decoded": decoded,
        "resumed_chunks": reused,
        "workers": pool_size,
        "chunk_size": chunk_size,
        "label_file": inputs.label_file.name,
        "root": str(root),
        "reused": False,
        "version": _VERSION,
        "inputs": inputs.fingerprint,
        "index": hashlib.sha256(index_bytes).hexdigest(),
        "arrays": arrays,
    }
    write_bytes(cache_dir / REPORT_NAME, json.dumps(report, indent=2).encode())
    shutil.rmtree(partial)
    log.info(
        "prepared %d images at %dpx in %s: %d corrupt, %d missing",
        len(ok),
        size,
        cache_dir,
        len(corrupt),
        len(inputs.missing),
    )
    return report


def open_cache(cache_dir: Path, size: int) -> tuple[np.ndarray, pd.DataFrame]:
    """The cache's read-only memmap uint8 [N, size, size] and its index (N rows, `INDEX_COLUMNS`).

    Raises FileNotFoundError if there is no cache of that size, ValueError if it is incomplete or stale.
    """
    cache_dir = Path(cache_dir)
    array_path, index_path = cache_array_path(cache_dir, size), cache_dir / INDEX_NAME
    command = f"run `xraycls prepare --root <NIH folder> --cache {cache_dir} --size {size}`"
    if not array_path.is_file() or not index_path.is_file():
        absent = array_path if not array_path.is_file() else index_path
        resume = " to resume the interrupted one" if (cache_dir / f".partial_{size}").is_dir() else ""
        raise FileNotFoundError(
            f"no {size}px cache in {cache_dir} ({absent.name} not found): {command}{resume}"
        )
    problem = _staleness(cache_dir, size, _read_report(cache_dir))
    if problem:
        raise ValueError(f"the {size}px cache in {cache_dir} is incomplete or stale: {problem}; {command}")
    array = np.load(array_path, mmap_mode="r", allow_pickle=False)
    index = pd.read_csv(index_path, dtype=_INDEX_DTYPES, keep_default_na=False)
    if len(array) != len(index) or tuple(index.columns) != INDEX_COLUMNS:
        raise ValueError(
            f"the {size}px cache in {cache_dir} is inconsistent: {len(array)} images, {len(index)} "
            f"index rows, columns {list(index.columns)}; {command}"
        )
    return array, index
