"""The one atomic write (`xraycls.files`): a failed write leaves the old target and no temporary behind; a
folder is swapped in whole; a PNG is saved through the same path."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.figure import Figure

from xraycls.files import atomic_dir, atomic_path, save_png, write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = write_text(tmp_path / "sub" / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("2")
        raise RuntimeError("interrupted")
    assert (target / "config.json").read_text() == "1"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["weights"]  # the old folder is gone, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_save_png_writes_a_png(tmp_path: Path) -> None:
    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1])
    out = save_png(fig, tmp_path / "plots" / "a.png", dpi=50)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.png"]
