"""`prepare_cache` / `open_cache` on real PNG trees: alignment, bad files, missing files, resume after a kill,
no-op reruns, several sizes, stale caches, bounded memory, and the real NIH sample images."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest
from _nih_sample import link_shared_sample
from _project import NIH_SHARED, PROJECT_ROOT
from PIL import Image

import xraycls.data.cache as cache_module
from xraycls.data.cache import (
    INDEX_COLUMNS,
    INDEX_NAME,
    REPORT_NAME,
    cache_array_path,
    cache_is_complete,
    open_cache,
    prepare_cache,
)
from xraycls.data.images import load_xray
from xraycls.data.labels import read_label_file
from xraycls.data.splits import attach_official_split
from xraycls.data.synthetic import LABEL_FILE_NAME, make_synthetic_nih
from xraycls.findings import LABELS

SIZE = 32


def _png(array: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", array)
    assert ok
    return encoded.tobytes()


def _build_tree(root: Path) -> dict[str, list[str]]:
    """40 synthetic 64 px images, then: one RGBA, one 16-bit, one non-square, one truncated, one empty,
    two label rows without a file, and one unlabelled extra PNG."""
    make_synthetic_nih(root, 40, size=64, seed=5)
    images = root / "images"
    names = read_label_file(root / LABEL_FILE_NAME)["image"].tolist()
    gray = cv2.imread(str(images / names[3]), cv2.IMREAD_UNCHANGED)
    rgba = io.BytesIO()
    Image.fromarray(np.stack([gray, gray, gray, np.full_like(gray, 255)], axis=2), "RGBA").save(rgba, "PNG")
    (images / names[3]).write_bytes(rgba.getvalue())
    deep = cv2.imread(str(images / names[5]), cv2.IMREAD_UNCHANGED).astype(np.uint16) * 16 + 300
    (images / names[5]).write_bytes(_png(deep))
    wide = cv2.resize(cv2.imread(str(images / names[8]), cv2.IMREAD_UNCHANGED), (96, 64))
    (images / names[8]).write_bytes(_png(wide))
    data = (images / names[11]).read_bytes()
    (images / names[11]).write_bytes(data[: len(data) // 2])
    (images / names[20]).write_bytes(b"")
    (images / names[25]).unlink()
    (images / names[39]).unlink()
    (images / "99999999_000.png").write_bytes(_png(gray))
    return {
        "all": names,
        "corrupt": [names[11], names[20]],
        "missing": [names[25], names[39]],
        "special": [names[3], names[5], names[8]],
    }


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("tree") / "raw"
    return root, _build_tree(root)


@pytest.fixture(scope="module")
def prepared(tree, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root, _ = tree
    cache = tmp_path_factory.mktemp("cache") / "cache"
    report = prepare_cache(root, cache, size=SIZE, workers=1, chunk_size=8, progress=False)
    return cache, report


def test_report_counts_corrupt_and_missing_images_by_name(tree, prepared) -> None:
    _, names = tree
    cache, report = prepared
    assert report["ok"] == 40 - 2 - 2
    assert [c["image"] for c in report["corrupt"]] == names["corrupt"]
    reasons = {c["image"]: c["reason"] for c in report["corrupt"]}
    assert "truncated" in reasons[names["corrupt"][0]]
    assert "empty file" in reasons[names["corrupt"][1]]
    assert report["missing"] == {"count": 2, "first": names["missing"]}
    assert report["unlabelled_images"] == 1
    assert report["size"] == SIZE and report["workers"] == 1 and report["label_file"] == LABEL_FILE_NAME
    assert report["seconds"] > 0 and report["images_per_s"] > 0
    assert json.loads((cache / REPORT_NAME).read_text()) == report
    assert not (cache / f".partial_{SIZE}").exists()


def test_every_array_row_is_its_index_image(tree, prepared) -> None:
    root, names = tree
    cache, _ = prepared
    array, index = open_cache(cache, SIZE)
    assert isinstance(array, np.memmap) and not array.flags.writeable
    assert array.shape == (36, SIZE, SIZE) and array.dtype == np.uint8
    assert tuple(index.columns) == INDEX_COLUMNS
    expected = [n for n in names["all"] if n not in names["corrupt"] + names["missing"]]
    assert index["image"].tolist() == expected  # label-file order
    for row, name in enumerate(index["image"]):
        np.testing.assert_array_equal(array[row], load_xray(root / "images" / name, SIZE), err_msg=name)
    # The RGBA copy of a gray image caches exactly like the gray image did before (R channel).
    rgba_row = expected.index(names["special"][0])
    assert array[rgba_row].std() > 0
    # Labels, metadata and split come from the label file and the lists, row for row.
    table = attach_official_split(read_label_file(root / LABEL_FILE_NAME), root).set_index("image")
    for column in ["patient_id", "split_official", *LABELS, "follow_up", "age_years", "sex", "view"]:
        assert index[column].tolist() == table.loc[expected, column].tolist(), column
    assert index[list(LABELS)].dtypes.eq(np.uint8).all()


def test_array_file_is_a_standard_npy(prepared) -> None:
    cache, _ = prepared
    array, _ = open_cache(cache, SIZE)
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array))
    assert cache_array_path(cache, SIZE).read_bytes() == buffer.getvalue()


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def counted(path: Path, size: int) -> np.ndarray:
        calls.append(Path(path).name)
        return load_xray(path, size)

    monkeypatch.setattr(cache_module, "load_xray", counted)
    return calls


def test_rerun_on_a_complete_cache_is_a_quick_no_op(tree, prepared, monkeypatch) -> None:
    root, _ = tree
    cache, first = prepared
    calls = _counting(monkeypatch)
    mtime = cache_array_path(cache, SIZE).stat().st_mtime_ns
    again = prepare_cache(root, cache, size=SIZE, workers=1, chunk_size=8, progress=False)
    assert again["reused"] is True and again["decoded"] == 0 and calls == []
    assert again["ok"] == first["ok"] and again["corrupt"] == first["corrupt"]
    assert cache_array_path(cache, SIZE).stat().st_mtime_ns == mtime
    assert cache_is_complete(cache, SIZE) and not cache_is_complete(cache, 48)


def test_process_pool_gives_the_same_bytes(tree, prepared, tmp_path: Path) -> None:
    root, _ = tree
    cache, _ = prepared
    report = prepare_cache(root, tmp_path / "pool", size=SIZE, workers=2, chunk_size=5, progress=False)
    assert report["workers"] == 2
    for name in (cache_array_path(cache, SIZE).name, INDEX_NAME):
        assert (tmp_path / "pool" / name).read_bytes() == (cache / name).read_bytes(), name


def test_two_sizes_share_a_folder_and_changed_inputs_make_the_other_stale(tree, tmp_path: Path) -> None:
    source, _ = tree
    root = tmp_path / "raw"
    shutil.copytree(source, root)
    cache = tmp_path / "cache"
    prepare_cache(root, cache, size=SIZE, workers=1, progress=False)
    prepare_cache(root, cache, size=16, workers=1, progress=False)
    assert open_cache(cache, SIZE)[0].shape[0] == open_cache(cache, 16)[0].shape[0] == 36
    # One more image arrives (a partial download grows): the 32 px cache is redone, the 16 px one is stale.
    lines = (root / LABEL_FILE_NAME).read_text().splitlines()
    name = "99999999_000.png"
    lines.append(f"{name},Hernia,0,99999999,50,M,PA,2500,2048,0.168,0.168")
    (root / LABEL_FILE_NAME).write_text("\n".join(lines) + "\n")
    with open(root / "test_list.txt", "a") as handle:
        handle.write(f"\n{name}")
    report = prepare_cache(root, cache, size=SIZE, workers=1, progress=False)
    assert report["reused"] is False and report["ok"] == 37 and report["unlabelled_images"] == 0
    array, index = open_cache(cache, SIZE)
    assert index["image"].iloc[-1] == name and index["Hernia"].iloc[-1] == 1 and len(array) == 37
    with pytest.raises(ValueError, match="16px cache .* stale: the 16px array was made from other inputs"):
        open_cache(cache, 16)
    assert not cache_is_complete(cache, 16)


_KILLED_RUN = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import xraycls.data.cache as cache

    real, calls = cache.load_xray, [0]

    def hang_after_three_chunks(path, size):
        calls[0] += 1
        if calls[0] > 3 * 4:  # chunk_size 4: the 4th chunk never finishes
            time.sleep(600)
        return real(path, size)

    cache.load_xray = hang_after_three_chunks
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    cache.prepare_cache(root, out, size=32, workers=1, chunk_size=4, progress=False)
    """
)


@pytest.fixture(scope="module")
def killed(tree, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder left by a prepare process killed (SIGKILL) after three of its ten chunks."""
    root, _ = tree
    cache = tmp_path_factory.mktemp("killed") / "cache"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(root), str(cache)], env=env)
    partial = cache / f".partial_{SIZE}"
    try:
        deadline = time.monotonic() + 120
        while len(list(partial.glob("chunk_*.json"))) < 3:
            assert child.poll() is None, "the prepare process ended before it could be killed"
            assert time.monotonic() < deadline, "the prepare process made no progress"
            time.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    return cache


def test_resume_after_a_kill_redoes_only_unfinished_chunks(tree, prepared, killed, tmp_path, monkeypatch):
    root, _ = tree
    reference, _ = prepared
    cache = tmp_path / "cache"
    shutil.copytree(killed, cache)
    assert not cache_array_path(cache, SIZE).exists() and not (cache / INDEX_NAME).exists()
    with pytest.raises(FileNotFoundError, match="xraycls prepare .* to resume the interrupted one"):
        open_cache(cache, SIZE)
    calls = _counting(monkeypatch)
    report = prepare_cache(root, cache, size=SIZE, workers=1, chunk_size=4, progress=False)
    assert report["resumed_chunks"] == 3
    assert len(calls) == 38 - 3 * 4  # 38 images present; three chunks of 4 were kept
    assert report["ok"] == 36 and report["decoded"] == 26
    for name in (cache_array_path(cache, SIZE).name, INDEX_NAME):
        assert (cache / name).read_bytes() == (reference / name).read_bytes(), name


def test_resume_with_other_settings_starts_over(tree, prepared, killed, tmp_path, monkeypatch, caplog):
    root, _ = tree
    reference, _ = prepared
    cache = tmp_path / "cache"
    shutil.copytree(killed, cache)
    calls = _counting(monkeypatch)
    with caplog.at_level(logging.INFO, logger="xraycls.data.cache"):
        report = prepare_cache(root, cache, size=SIZE, workers=1, chunk_size=6, progress=False)
    assert "starting the 32px cache over" in caplog.text
    assert report["resumed_chunks"] == 0 and len(calls) == 38
    assert (cache / INDEX_NAME).read_bytes() == (reference / INDEX_NAME).read_bytes()


def test_missing_inputs_fail_before_any_work(tree, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no images folder at .*nowhere"):
        prepare_cache(tmp_path / "nowhere", tmp_path / "c", size=SIZE, progress=False)
    root = tmp_path / "raw"
    (root / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no NIH label file"):
        prepare_cache(root, tmp_path / "c", size=SIZE, progress=False)
    source, _ = tree
    for name in (LABEL_FILE_NAME, "train_val_list.txt", "test_list.txt"):
        shutil.copy(source / name, root / name)
    with pytest.raises(FileNotFoundError, match="none of the 40 images"):
        prepare_cache(root, tmp_path / "c", size=SIZE, progress=False)
    with pytest.raises(ValueError, match="chunk_size must be a positive whole number, got 0"):
        prepare_cache(source, tmp_path / "c", size=SIZE, chunk_size=0, progress=False)
    with pytest.raises(ValueError, match="workers must be a positive whole number, got 0"):
        prepare_cache(source, tmp_path / "c", size=SIZE, workers=0, progress=False)
    assert not (tmp_path / "c").exists()


def test_too_little_disk_space_stops_before_decoding(tree, tmp_path, monkeypatch) -> None:
    root, _ = tree
    calls = _counting(monkeypatch)
    free = 38 * SIZE * SIZE  # room for the chunks or the array, not both
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: SimpleNamespace(free=free))
    with pytest.raises(ValueError, match=r"not enough free disk space in .*cache"):
        prepare_cache(root, tmp_path / "cache", size=SIZE, workers=1, progress=False)
    assert calls == []


def test_open_cache_explains_absent_incomplete_and_inconsistent_caches(prepared, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no 32px cache .*run `xraycls prepare"):
        open_cache(tmp_path / "empty", SIZE)
    source, _ = prepared
    cache = tmp_path / "cache"
    shutil.copytree(source, cache)
    (cache / REPORT_NAME).unlink()  # as if killed between the index and the report
    with pytest.raises(ValueError, match="incomplete or stale: prepare_report.json is missing"):
        open_cache(cache, SIZE)
    shutil.copy(source / REPORT_NAME, cache / REPORT_NAME)
    index = pd.read_csv(cache / INDEX_NAME)
    index.iloc[:-1].to_csv(cache / INDEX_NAME, index=False)
    with pytest.raises(ValueError, match="index.csv is missing or was changed"):
        open_cache(cache, SIZE)


_PEAK_RSS = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    from xraycls.data.cache import prepare_cache
    prepare_cache(Path(sys.argv[1]), Path(sys.argv[2]), size=128, workers=1, chunk_size=32, progress=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
    """
)


def test_peak_memory_does_not_grow_with_the_number_of_images(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    peaks = {}
    for n in (64, 512):
        root = tmp_path / f"raw{n}"
        make_synthetic_nih(root, n, size=256, seed=n)
        result = subprocess.run(
            [sys.executable, "-c", _PEAK_RSS, str(root), str(tmp_path / f"cache{n}")],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        peaks[n] = int(result.stdout.split()[-1]) / 1024
    # Keeping each decoded 128 px image until the end would add 7 MiB for the extra 448 images (measured:
    # 7.4 MiB); streaming the chunks adds nothing measurable (0.2 MiB).
    assert peaks[512] - peaks[64] < 4, peaks


@pytest.mark.real_nih
def test_real_sample_images_prepare_with_their_labels(tmp_path: Path) -> None:
    manifest = pd.read_csv(NIH_SHARED / "sample_manifest.csv")
    root = link_shared_sample(NIH_SHARED, tmp_path / "nih")
    report = prepare_cache(root, tmp_path / "cache", size=SIZE, workers=1, progress=False)
    assert report["ok"] == 100 and report["corrupt"] == [] and report["missing"]["count"] == 0
    array, index = open_cache(tmp_path / "cache", SIZE)
    expected = manifest.set_index("Image Index").loc[index["image"]]
    assert index["split_official"].tolist() == expected["official_split"].tolist()
    for row, (_, labels) in enumerate(expected["Finding Labels"].items()):
        names = set(labels.split("|"))
        assert [label for label in LABELS if index.loc[row, label] == 1] == [
            label for label in LABELS if label in names
        ]
    rgba = expected.index[expected["mode"] == "RGBA"][0]
    row = index.index[index["image"] == rgba][0]
    red = np.asarray(Image.open(NIH_SHARED / "sample" / rgba))[:, :, 0]
    np.testing.assert_array_equal(array[row], cv2.resize(red, (SIZE, SIZE), interpolation=cv2.INTER_AREA))
