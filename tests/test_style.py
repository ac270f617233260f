"""The code's shape, checked the way CI checks everything else: by the README's test command.

ruff (configured in pyproject.toml: line length 120, pycodestyle and pyflakes rules) and ruff's
formatter; no source file over 400 lines and no function over 60 outside the tests; the layers
run one way (``elsa`` <- ``pipelines`` <- ``tune`` <- ``cli``); one place builds a TorchTrainer.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("elsa", "pipelines", "tune", "cli", "clusters", "bench", "scripts")


def _ruff() -> list[str]:
    beside = Path(sys.executable).with_name("ruff")
    found = str(beside) if beside.exists() else shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    return [found]


def _sources() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py"))


def test_ruff_finds_nothing():
    result = subprocess.run([*_ruff(), "check", "--no-cache", str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


def test_ruff_format_leaves_every_file_as_it_is():
    result = subprocess.run([*_ruff(), "format", "--check", "--no-cache", str(REPO)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


def test_no_file_over_400_lines_and_no_function_over_60():
    long_files, long_functions = [], []
    for path in _sources():
        text = path.read_text()
        if len(text.splitlines()) > 400:
            long_files.append(f"{path.relative_to(REPO)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long_functions.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {length} lines")
    assert not long_files and not long_functions, long_files + long_functions


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(
    "layer, above",
    [("elsa", {"pipelines", "tune", "cli", "ray", "mlflow"}), ("pipelines", {"tune", "cli"}), ("tune", {"cli"})],
)
def test_layers_import_only_downwards(layer, above):
    wrong = {
        f"{path.relative_to(REPO)} imports {sorted(_imported(path) & above)}"
        for path in (REPO / layer).rglob("*.py")
        if _imported(path) & above
    }
    assert not wrong, sorted(wrong)


def test_one_torch_trainer_builder():
    calls = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path in _sources()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "TorchTrainer"
    ]
    assert len(calls) == 1 and calls[0].startswith("pipelines/run/trainer.py:"), calls
