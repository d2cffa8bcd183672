"""The `xraycls` command line end to end: synth -> prepare -> inspect, and one-line errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from xraycls.cli import main
from xraycls.findings import LABELS


@pytest.fixture(scope="module")
def demo_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("cli")
    raw, cache = base / "raw", base / "cache"
    assert main(["synth", "--out", str(raw), "--n", "120", "--size", "64", "--min-prevalence", "0.1"]) == 0
    assert main(["prepare", "--root", str(raw), "--cache", str(cache), "--size", "32", "--quiet"]) == 0
    return raw, cache


def test_synth_then_prepare_writes_the_documented_cache(demo_tree: tuple[Path, Path]) -> None:
    _raw, cache = demo_tree
    report = json.loads((cache / "prepare_report.json").read_text())
    assert report["ok"] == 120
    assert report["corrupt"] == []
    assert report["missing"]["count"] == 0
    assert (cache / "images_u8_32.npy").is_file()
    header = (cache / "index.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["image", "patient_id", "split_official"]
    assert header[3 : 3 + len(LABELS)] == list(LABELS)


def test_inspect_reads_every_training_batch_and_summarises(
    demo_tree: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _raw, cache = demo_tree
    argv = ["inspect", "--cache", str(cache), "--size", "32", "--input-size", "28", "--batch-size", "8"]
    assert main([*argv, "--workers", "0"]) == 0
    summary = json.loads(capsys.readouterr().out)
    train_images = summary["images"]["train"]
    loader = summary["loader_pass"]
    # drop_last: every batch is full, and the pass covers all but the remainder of the training part.
    assert loader["batch_shape"] == [8, 28, 28]
    assert loader["dtype"] == "torch.uint8"
    assert loader["images"] == (train_images // 8) * 8
    assert summary["leaked_patients"] == 0
    assert sum(summary["images"].values()) == 120


def test_prepare_without_images_folder_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["prepare", "--root", str(tmp_path / "nowhere"), "--cache", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "nowhere" in err
    assert not (tmp_path / "c" / "index.csv").exists()


def test_download_rejects_an_archive_number_out_of_range(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["download", "--root", "unused", "--archives", "13", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "13" in err


def test_console_script_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "xraycls", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    for command in ("download", "synth", "prepare", "inspect"):
        assert command in result.stdout
