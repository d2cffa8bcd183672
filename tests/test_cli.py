"""The `xraycls` command line end to end: synth -> prepare -> inspect, and one-line errors on bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from _project import PROJECT_ROOT

from xraycls.cli import main
from xraycls.findings import LABELS
from xraycls.hardware.ipu import IPUUnavailableError
from xraycls.hardware.plan import PlanError
from xraycls.model.checkpoint import CheckpointError


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


# ------------------------------------------------------------------------------ errors and exit status
@pytest.mark.parametrize(
    ("error", "code"),
    [
        (PlanError("hardware.devices=3: not a pod size"), 2),
        (CheckpointError("last.ckpt: holds pickled code"), 2),
        (IPUUnavailableError("hardware=vpod4 needs PopTorch"), 2),
        (FileNotFoundError("label file x.csv: no such file"), 2),
        (PermissionError(13, "Permission denied", "/data/out/p.csv"), 1),
        (OSError(28, "No space left on device", "/data/cache/images_u8_256.npy"), 1),
    ],
)
def test_errors_are_one_line_with_the_documented_exit_status(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: Exception, code: int
) -> None:
    import xraycls.data.synthetic

    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(xraycls.data.synthetic, "make_synthetic_nih", fail)
    monkeypatch.delenv("XRAYCLS_DEBUG", raising=False)
    assert main(["synth", "--out", "unused", "--n", "1"]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("xraycls synth: error: ")
    if isinstance(error, PermissionError):  # the system's OSError as 'path: reason', not "[Errno 13] ..."
        assert err == "xraycls synth: error: /data/out/p.csv: Permission denied\n"
    monkeypatch.setenv("XRAYCLS_DEBUG", "1")  # the traceback instead
    with pytest.raises(type(error)):
        main(["synth", "--out", "unused", "--n", "1"])


# -------------------------------------------------------------------- output locations before any work
@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_bundle_dir: Path) -> tuple[Path, Path]:
    """(model bundle, one PNG it can predict): a random tiny ViT, nothing trained."""
    import cv2
    import numpy as np

    from xraycls.inference.bundle import load_bundle

    size = int(load_bundle(tiny_bundle_dir).preprocessing["input_size"])
    image = tmp_path_factory.mktemp("png") / "x.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 256, (size, size), dtype=np.uint8))
    return tiny_bundle_dir, image


def _output_cases(model: Path, image: Path, blocked: Path) -> list[tuple[list[str], str, Path]]:
    """(argv, setting named in the error, the path that must not appear): every command's outputs, each
    pointed inside `blocked`, a regular file, so its folder can never be made."""
    predict = ["predict", "--model", str(model), str(image)]  # no --quiet: a progress bar would show
    return [
        ([*predict, "--out", str(blocked / "p.csv")], "--out", blocked / "p.csv"),
        ([*predict, "--grid", str(blocked / "g.png")], "--grid", blocked / "g.png"),
        ([*predict, "--heatmaps", str(blocked / "h")], "--heatmaps", blocked / "h"),
        (["export", "--model", str(model), "--onnx", str(blocked / "m.onnx")], "--onnx", blocked / "m.onnx"),
        (["export", "--model", str(model), "--hf", str(blocked / "hf")], "--hf", blocked / "hf"),
        (["import-hf", "--from", str(model), "--out", str(blocked / "m")], "--out", blocked / "m"),
        (["synth", "--out", str(blocked / "raw"), "--n", "4"], "--out", blocked / "raw"),
        (["download", "--root", str(blocked / "nih"), "--quiet"], "--root", blocked / "nih"),
        (["cost", "--runs", str(model), "--out", str(blocked / "c")], "--out", blocked / "c"),
        (["sweep-report", str(model), "--out", str(blocked / "r")], "--out", blocked / "r"),
    ]


def test_every_output_location_is_checked_before_any_work(
    tiny_bundle: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Tests run as root, and root writes through any mode bits (os.access says yes to everything): a folder
    # that cannot be written is made here as a path under a regular file, which no user can create. (The
    # permission branch itself: test_a_folder_without_write_permission_is_refused.)
    model, image = tiny_bundle
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("a file")
    for argv, setting, target in _output_cases(model, image, blocked):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err  # no progress bar, no traceback, no second message
        assert err.startswith(f"xraycls {argv[0]}: error: {setting} {target}: cannot be created: "), err
        assert f"{blocked} is a file, not a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder"]


def test_prepare_into_an_impossible_cache_folder_says_so(
    demo_tree: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw, _cache = demo_tree
    (tmp_path / "f").write_text("a file")
    argv = ["prepare", "--root", str(raw), "--cache", str(tmp_path / "f" / "c"), "--size", "16", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cache folder {tmp_path / 'f' / 'c'}: cannot be created" in err


def test_a_folder_where_a_file_is_expected_is_refused(
    tiny_bundle: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, image = tiny_bundle
    predict = ["predict", "--model", str(model), str(image)]
    for setting, name, argv in (
        ("--out", "p.csv", predict),
        ("--grid", "g.png", predict),
        ("--onnx", "m.onnx", ["export", "--model", str(model)]),
    ):
        folder = tmp_path / name
        folder.mkdir()
        assert main([*argv, setting, str(folder)]) == 2
        expected = f"xraycls {argv[0]}: error: {setting} {folder}: is a folder; give a file name\n"
        assert capsys.readouterr().err == expected
        assert not any(folder.iterdir())


def _xraycls(
    *argv: str, env: dict[str, str] | None = None, cwd: Path | None = None, code: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The real entry point (`python -m xraycls`, or `python -c code`), this checkout's package first."""
    path = os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])
    environment = {k: v for k, v in os.environ.items() if k != "XRAYCLS_DEBUG"}
    environment.update(PYTHONPATH=path, **(env or {}))
    entry = ["-m", "xraycls"] if code is None else ["-c", code]
    return subprocess.run(
        [sys.executable, *entry, *argv], capture_output=True, text=True, check=False, env=environment, cwd=cwd
    )


def test_predict_into_an_impossible_out_predicts_nothing(
    tiny_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    """The issue's case: `--out` that cannot be written used to predict every image and then fail with two
    chained tracebacks; now one line before the model is even loaded, and XRAYCLS_DEBUG=1 shows where."""
    model, image = tiny_bundle
    (tmp_path / "ro").write_text("a file")
    argv = ["predict", "--model", str(model), str(image), "--out", str(tmp_path / "ro" / "p.csv")]
    result = _xraycls(*argv)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1].startswith("xraycls predict: error: --out ")
    assert "Traceback" not in result.stderr and "predicted" not in result.stderr and "%|" not in result.stderr
    debug = _xraycls(*argv, env={"XRAYCLS_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "check_output_file" in debug.stderr


_AS_NOBODY = """\
import locale, os, sys  # locale: argparse imports it lazily, from files `nobody` may not read
import xraycls.cli, xraycls.data.synthetic  # likewise imported while still root
os.setgid(65534); os.setuid(65534)
sys.exit(xraycls.cli.main(sys.argv[1:]))
"""


def test_a_folder_without_write_permission_is_refused(tmp_path: Path) -> None:
    """The os.access / probe branch for real: root writes through mode bits, so as root the child switches
    to `nobody` once imported, then runs the command against a 0555 folder."""
    base = Path(tempfile.mkdtemp(prefix="xraycls-ro-"))  # not under tmp_path (0700): `nobody` must reach it
    try:
        base.chmod(0o755)
        locked = base / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        argv = ["synth", "--out", str(locked / "raw"), "--n", "2"]
        if os.geteuid() == 0:
            result = _xraycls(*argv, cwd=base, code=_AS_NOBODY)
        else:
            result = _xraycls(*argv, cwd=base)
        assert result.returncode == 2, result.stderr
        assert result.stderr.splitlines() == [
            f"xraycls synth: error: --out {locked / 'raw'}: cannot write in {locked} (permission denied)"
        ]
        assert list(locked.iterdir()) == []
    finally:
        shutil.rmtree(base)


# ------------------------------------------------------------------------------------------- prepare
def test_a_reused_cache_says_so(demo_tree: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    raw, cache = demo_tree
    assert main(["prepare", "--root", str(raw), "--cache", str(cache), "--size", "32", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert (
        out.startswith(f"reused the complete 32 px cache in {cache} (120 images, ")
        and "nothing decoded" in out
    )
    assert "images/s" not in out


def test_a_refused_size_leaves_no_chunk_folder(
    demo_tree: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The disk check refuses the size before decoding; the chunk folder made for it goes, and so does the
    cache folder when prepare made it. (10^6 px rather than the issue's 10^5: 120 images then need about
    240 TB, more than any test disk has, so nothing is ever decoded at that size.)"""
    raw, cache = demo_tree
    before = sorted(p.name for p in cache.iterdir())
    for folder in (tmp_path / "new_cache", cache):
        argv = ["prepare", "--root", str(raw), "--cache", str(folder), "--size", "1000000", "--quiet"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"not enough free disk space in {folder}:" in err
    assert not (tmp_path / "new_cache").exists()
    assert sorted(p.name for p in cache.iterdir()) == before  # no .partial_1000000 beside the cache


def test_prepare_reads_a_renamed_label_file_with_labels(
    demo_tree: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = shutil.copytree(demo_tree[0], tmp_path / "raw")
    (raw / "Data_Entry_2017_v2020.csv").rename(raw / "my_labels.csv")
    argv = ["prepare", "--root", str(raw), "--cache", str(tmp_path / "cache"), "--size", "16", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no NIH label file in" in err and "xraycls prepare --labels FILE" in err
    assert main([*argv, "--labels", str(raw / "my_labels.csv")]) == 0
    report = json.loads((tmp_path / "cache" / "prepare_report.json").read_text())
    assert report["ok"] == 120 and report["label_file"] == "my_labels.csv"
    assert main([*argv, "--labels", str(raw / "nope.csv")]) == 2
    assert f"label file {raw / 'nope.csv'}: no such file" in capsys.readouterr().err


# ----------------------------------------------------------------------- import-hf, export --hf, sweeps
def test_import_hf_then_export_hf_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tiny transformers ViTForImageClassification (as tests/test_hf_vit.py builds it, alphabetical labels
    like the guide's) becomes a bundle with `import-hf`, and goes back with `export --hf`."""
    transformers = pytest.importorskip("transformers")
    import numpy as np

    from xraycls.inference.bundle import load_bundle

    names = sorted(LABELS)
    config = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
        patch_size=8, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        problem_type="multi_label_classification",
    )  # fmt: skip
    transformers.ViTForImageClassification(config).eval().save_pretrained(tmp_path / "guide")
    bundle = tmp_path / "run" / "model"
    assert main(["import-hf", "--from", str(tmp_path / "guide"), "--out", str(bundle)]) == 0
    assert f"as the model bundle {bundle}" in capsys.readouterr().out
    loaded = load_bundle(bundle)
    assert loaded.labels == list(LABELS) and loaded.preprocessing["input_size"] == 32

    assert main(["export", "--model", str(bundle), "--hf", str(tmp_path / "hf")]) == 0
    assert f"wrote {tmp_path / 'hf'}: a transformers ViTForImageClassification" in capsys.readouterr().out
    back = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    assert [back.config.id2label[i] for i in range(len(LABELS))] == list(LABELS)
    images = list(np.random.default_rng(0).integers(0, 256, (2, 32, 32), dtype=np.uint8))
    import torch

    with torch.no_grad():
        x = loaded.preprocess(images)
        torch.testing.assert_close(back(pixel_values=x).logits, loaded.model(x), rtol=0, atol=1e-5)

    # ONNX-only settings with --hf, and both targets at once, are refused before any work.
    capsys.readouterr()  # transformers' own loading bar, from from_pretrained above
    assert main(["export", "--model", str(bundle), "--hf", str(tmp_path / "hf2"), "--opset", "17"]) == 2
    assert (
        capsys.readouterr().err == "xraycls export: error: --opset: settings of --onnx; --hf takes neither\n"
    )
    with pytest.raises(SystemExit) as stop:
        main(["export", "--model", str(bundle), "--hf", str(tmp_path / "hf2"), "--onnx", "m.onnx"])
    assert stop.value.code == 2
    assert "xraycls export: error: argument --onnx: not allowed with argument --hf" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--model", str(bundle)])
    assert "one of the arguments --onnx --hf is required" in capsys.readouterr().err
    assert not (tmp_path / "hf2").exists()


def test_sweep_report_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_sweep_report import _grid_sweep  # the fixed trial files of the sweep report's own tests

    sweep = tmp_path / "sweep"
    _grid_sweep(sweep)
    assert main(["sweep-report", str(sweep)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert f"wrote {sweep / 'report' / 'sweep_report.md'}" in printed
    assert {f"wrote {sweep / 'report' / name}" for name in ("trials.csv", "configurations.csv")} <= set(
        printed
    )
    assert all(Path(line.removeprefix("wrote ")).is_file() for line in printed)
    assert "optim.lr=2e-3" in (sweep / "report" / "sweep_report.md").read_text()

    # An unfinished trial: one line and exit 2 (the record is input); --allow-unfinished reports without it.
    (sweep / "trial_9" / ".hydra").mkdir(parents=True)
    (sweep / "trial_9" / ".hydra" / "overrides.yaml").write_text("- optim.lr=5e-3\n- seed=1\n")
    assert main(["sweep-report", str(sweep), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("xraycls sweep-report: error: ") and "unfinished" in err
    assert main(["sweep-report", str(sweep), "--out", str(tmp_path / "r"), "--allow-unfinished"]) == 0
    assert "## Unfinished trials (left out)" in (tmp_path / "r" / "sweep_report.md").read_text()
    assert main(["sweep-report", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.endswith(f"error: {tmp_path / 'nowhere'}: no such sweep folder\n")
    (tmp_path / "empty").mkdir()
    assert main(["sweep-report", str(tmp_path / "empty")]) == 2
    assert f"error: {tmp_path / 'empty'}: no trials (no trials.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "empty" / "report").exists()
