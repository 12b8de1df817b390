"""The package's phases are layers (pyproject.toml [tool.importlinter]): import-linter checks them on every run.

The second test copies the package, adds one upward import (a record module importing the plan), and checks that
the same contracts then fail: the contract is a check that can fail, not a list that is only read.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from .conftest import REPO

LINT = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]


def _lint(cwd, pythonpath) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([*LINT, "--config", str(REPO / "pyproject.toml"), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_phases_are_layers_without_circles_and_the_schema_is_a_leaf():
    result = _lint(REPO, REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout


def test_a_lower_layer_importing_a_higher_one_breaks_the_contract(tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(REPO / "alignment", copy / "alignment", ignore=shutil.ignore_patterns("__pycache__", "fixtures"))
    rundir = copy / "alignment" / "records" / "rundir.py"
    rundir.write_text(rundir.read_text() + "\nimport alignment.plan.resolved  # upward: records importing plan\n")
    result = _lint(tmp_path, copy)
    assert result.returncode != 0, result.stdout[-3000:]
    assert "Phases are layers: higher ones import lower ones only BROKEN" in result.stdout
    assert "alignment.records.rundir -> alignment.plan.resolved" in result.stdout
