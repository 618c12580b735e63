"""The stages only look down: import-linter keeps the contracts of pyproject.toml, and they fail on a backward import.

The contracts (README "Architecture"): ``stages`` lists the packages top to bottom, a module importing from a stage
above its own breaks it; ``acyclic`` forbids import cycles between the modules of one package. The second test lints
a throw-away copy of the package with one backward import and one cycle injected, so a contract that silently stopped
checking (a renamed package, a layer left out) would fail here too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` in ``cwd`` (its pyproject.toml), finding the ``medseg`` package of ``cwd`` first."""
    executable = Path(sys.executable).with_name("lint-imports")
    if not executable.is_file():
        found = shutil.which("lint-imports")
        if found is None:
            pytest.fail("lint-imports is not installed: pip install -c constraints.txt -e '.[dev]'")
        executable = Path(found)
    # CI runs under an ASCII locale; lint-imports draws its banner with box characters, so ask for UTF-8 both ways.
    env = {**os.environ, "PYTHONPATH": str(cwd), "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [str(executable), "--no-cache"], cwd=cwd, env=env, capture_output=True, encoding="utf-8", errors="replace",
        timeout=120,
    )  # fmt: skip


def test_the_package_keeps_its_import_contracts():
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_a_backward_import_or_a_cycle_breaks_the_contracts(tmp_path):
    shutil.copytree(REPO / "medseg", tmp_path / "medseg", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    io = tmp_path / "medseg" / "data" / "io.py"
    io.write_text(io.read_text() + "\nimport medseg.inference  # the data stage reaching up\n")
    atomic = tmp_path / "medseg" / "atomic.py"  # core siblings may import each other, but not in a circle
    atomic.write_text(atomic.read_text() + "\nimport medseg.runs  # runs imports atomic\n")

    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "Contracts: 0 kept, 2 broken." in result.stdout, result.stdout + result.stderr
    assert "medseg.data is not allowed to import medseg.inference" in result.stdout
    assert "medseg.data.io -> medseg.inference" in result.stdout
    assert "No cycles are allowed in medseg." in result.stdout
