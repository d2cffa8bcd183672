"""experiments/walkthrough.ipynb: committed without outputs, in sync with its percent script, and run in demo
mode from start to end by a kernel of this interpreter, leaving the files each step promises."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from _project import PROJECT_ROOT

jupytext = pytest.importorskip("jupytext", reason="the notebook extra: pip install -e '.[notebook]'")
nbformat = pytest.importorskip("nbformat", reason="the notebook extra: pip install -e '.[notebook]'")

NOTEBOOK = PROJECT_ROOT / "experiments" / "walkthrough.ipynb"
SCRIPT = NOTEBOOK.with_suffix(".py")


def _cells(path: Path) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in jupytext.read(path).cells]


def test_notebook_and_script_are_in_sync() -> None:
    notebook, script = _cells(NOTEBOOK), _cells(SCRIPT)
    assert notebook == script, "run `jupytext --sync experiments/walkthrough.py` (or .ipynb) and commit both"
    assert json.loads(NOTEBOOK.read_text())["metadata"]["jupytext"]["formats"] == "ipynb,py:percent"


def test_committed_notebook_has_no_outputs() -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code
    dirty = [i for i, cell in enumerate(code) if cell.outputs or cell.execution_count is not None]
    assert not dirty, f"code cells {dirty} carry outputs: clear them before committing"
    assert notebook.metadata.kernelspec.name == "python3"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_notebook_runs_in_demo_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbclient import NotebookClient

    work = tmp_path / "work"
    monkeypatch.setenv("XRAYCLS_NOTEBOOK_DIR", str(work))
    # The kernel and its commands import this checkout's package, whatever is installed.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.getenv("PYTHONPATH")]))
    )
    # One intra-op thread, as the one_torch_thread fixture: OpenMP threads spinning against other processes
    # on a small shared CPU made a tiny fit several times slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # "python3": jupyter_client runs a kernel spec whose command is `python` with sys.executable. Started
    # in a folder outside the project, the notebook finds the project from the imported package.
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell, when any cell fails
    seconds = time.perf_counter() - start
    print(f"walkthrough notebook, demo mode: {seconds:.1f} s")

    shown = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    printed = "".join(output.get("text", "") for output in shown)
    assert f"python {sys.executable}\n" in printed
    assert f"xraycls {PROJECT_ROOT / 'xraycls' / '__init__.py'}\n" in printed
    assert f"project {PROJECT_ROOT}\n" in printed
    run_dir = work / "runs" / "demo"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metrics"]["test"]["ci"]["resamples"] == 200
    metrics = json.loads((work / "evaluate" / "metrics.json").read_text())
    assert metrics["part"] == "test"
    assert metrics["ci"]["resamples"] == 200
    low, high = metrics["ci"]["auroc_macro14"]
    assert low <= metrics["auroc_macro14"] <= high
    assert (work / "predict" / "grid.png").stat().st_size > 0
    assert "What a run costs" in (work / "cost" / "cost_report.md").read_text()
    assert sum("image/png" in output.get("data", {}) for output in shown) >= 7
