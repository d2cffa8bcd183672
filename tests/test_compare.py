"""`xraycls compare`: paired columns for models on the same images, none (with the reason) for different
image sets, the guide's two published rows and nothing from the papers; on the demo run (slow), a run
directory and an evaluate output of its model pair up with a zero difference."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from xraycls.cli import main
from xraycls.evaluation.compare import run_compare
from xraycls.evaluation.predictions import ScoredImages, write_scored_images
from xraycls.files import write_json
from xraycls.findings import LABELS


def _evaluation(
    folder: Path, images: list[str], seed: int, part: str = "test", shift: float = 0.0, reverse: bool = False
) -> Path:
    """An evaluate-style output (metrics.json + predictions.csv) with a planted signal of strength `shift`;
    `reverse` writes the rows in reverse order."""
    rng = np.random.default_rng(0)  # the same labels and patients for every model of one image list
    n = len(images)
    labels = (rng.random((n, len(LABELS))) < 0.3).astype(np.float32)
    patients = np.arange(n) // 2
    noise = np.random.default_rng(seed).normal(size=labels.shape)
    probs = 1.0 / (1.0 + np.exp(-(noise + shift * labels)))
    rows = slice(None, None, -1 if reverse else 1)
    scored = ScoredImages(np.array(images)[rows], patients[rows], probs[rows], labels[rows])
    write_scored_images(folder / "predictions.csv", scored)
    write_json(folder / "metrics.json", {"split": "official", "part": part})
    return folder


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_same_images_are_paired_and_other_images_are_not(tmp_path: Path) -> None:
    names = [f"{i:08d}_000.png" for i in range(120)]
    a = _evaluation(tmp_path / "a", names, seed=1, shift=1.0)
    b = _evaluation(tmp_path / "b", names, seed=2, shift=2.0, reverse=True)  # same images, other order
    c = _evaluation(tmp_path / "c", [f"9{i:07d}_000.png" for i in range(60)], seed=3, part="val")
    written = run_compare([a, b, c], tmp_path / "out", bootstrap=200, seed=0)
    assert {path.name for path in written.values()} == {"compare.md", "compare.csv", "forest.png"}
    rows = _rows(tmp_path / "out" / "compare.csv")
    b_macro = next(r for r in rows if r["model"] == "B" and r["row"] == "auroc_macro14")
    assert float(b_macro["difference"]) > 0 and float(b_macro["p_bootstrap"]) < 0.05
    assert float(b_macro["diff_lo"]) <= float(b_macro["difference"]) <= float(b_macro["diff_hi"])
    b_finding = next(r for r in rows if r["model"] == "B" and r["row"] == "Atelectasis")
    assert b_finding["p_delong"] != "" and b_finding["delong_difference"] != ""
    c_macro = next(r for r in rows if r["model"] == "C" and r["row"] == "auroc_macro14")
    assert c_macro["difference"] == "" and "different images" in c_macro["note"]
    published = [r for r in rows if r["kind"] == "PUBLISHED"]
    assert sorted(float(r["auroc"]) for r in published) == [0.7681, 0.7916]
    assert sorted(float(r["loss"]) for r in published) == [0.1785, 0.1875]
    text = (tmp_path / "out" / "compare.md").read_text()
    assert "No paired column: C and A are scored on different images" in text
    assert "### B - A" in text and "PUBLISHED: Graphcore" in text and "PUBLISHED: Gcore" in text
    assert "Rows from the papers" in text and "omitted" in text


def test_compare_refuses_bad_inputs_before_scoring(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = _evaluation(tmp_path / "a", [f"{i:08d}_000.png" for i in range(20)], seed=1)
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(a), str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "neither a run directory" in capsys.readouterr().err
    assert main(["compare", str(a), "--out", str(tmp_path / "out")]) == 2
    assert "at least two models" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_run_and_an_evaluation_of_its_model_pair_up(
    demo_run: tuple[Path, dict, float], data_dir: Path, tmp_path: Path
) -> None:
    run_dir, _summary, _seconds = demo_run
    cache = str(data_dir / "demo" / "cache")
    code = main(["evaluate", "--model", str(run_dir / "model"), "--cache", cache, "--bootstrap", "200",
                 "--device", "cpu", "--quiet", "--out", str(tmp_path / "ev")])  # fmt: skip
    assert code == 0
    run_compare([run_dir, tmp_path / "ev"], tmp_path / "out", bootstrap=200)
    rows = _rows(tmp_path / "out" / "compare.csv")
    macro = next(r for r in rows if r["model"] == "B" and r["row"] == "auroc_macro14")
    assert abs(float(macro["difference"])) < 1e-6
