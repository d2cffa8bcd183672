"""Import hygiene: inference and evaluation load with torch + timm alone (DESIGN.md: no Lightning,
torchmetrics or Hydra), and no two modules of the package import each other, directly or around a loop."""

from __future__ import annotations

import ast
import importlib.util
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

import xraycls

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TRAINING_STACK = ("lightning", "torchmetrics", "hydra", "omegaconf", "pytorch_lightning")
EXPECTED_CYCLES: set[frozenset[str]] = set()  # none: every intra-package import runs one way


def test_inference_and_evaluation_import_no_training_stack() -> None:
    code = (
        "import sys, xraycls.inference, xraycls.inference.predict_run, xraycls.inference.onnx_export, "
        "xraycls.inference.heatmaps, xraycls.inference.calibration, xraycls.evaluation.evaluate, "
        "xraycls.evaluation.compare, xraycls.evaluation.paired; "
        f"print(sorted(m for m in {TRAINING_STACK!r} if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"xraycls.inference/evaluation loaded {result.stdout.strip()}"


# `xraycls predict` on one PNG with a tiny bundle, through the CLI's own entry in a fresh process; prints
# its exit code and the training-stack modules it loaded.
_CLI_PREDICT = """
import sys
from xraycls.cli import main
model, image, out = sys.argv[1:4]
code = main(["predict", "--model", model, image, "--out", out, "--device", "cpu", "--quiet"])
print(code, sorted(m for m in sys.argv[4].split(",") if m in sys.modules))
"""


def test_cli_predict_loads_no_training_stack(tmp_path: Path, tiny_bundle_dir: Path) -> None:
    image = tmp_path / "x.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 256, (96, 96), dtype=np.uint8))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "p.csv"
    command = [sys.executable, "-c", _CLI_PREDICT, str(tiny_bundle_dir), str(image), str(out)]
    result = subprocess.run(
        [*command, ",".join(TRAINING_STACK)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "0 []", result.stdout
    rows = [line for line in out.read_text().splitlines() if not line.startswith("#")]
    assert len(rows) == 2  # the header and the one image


def _modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> source file."""
    found = {"xraycls": Path(xraycls.__file__)}
    for info in pkgutil.walk_packages(xraycls.__path__, prefix="xraycls."):
        spec = importlib.util.find_spec(info.name)
        assert spec is not None and spec.origin is not None, info.name
        found[info.name] = Path(spec.origin)
    return found


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules `name` imports anywhere in its file: top level, in functions, TYPE_CHECKING."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets.add(base)
            # `from package import submodule` imports that submodule.
            targets.update(
                f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules
            )
    return {target for target in targets if target in modules and target != name}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import loop as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return [*path[path.index(child) :], child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(graph[child])))
    return None


def test_no_import_cycles_in_the_package() -> None:
    modules = _modules()
    assert "xraycls.inference.predict" in modules and "xraycls.model.backbone" in modules
    graph = {name: _imported(name, path, modules) for name, path in modules.items()}
    for pair in EXPECTED_CYCLES:
        a, b = sorted(pair)
        graph[a].discard(b)
        graph[b].discard(a)
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _find_cycle(graph) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
