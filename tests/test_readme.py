"""README opens with the two commands, and CI runs exactly the README's test command."""

from __future__ import annotations

import re

from .conftest import REPO


def _commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (REPO / "README.md").read_text())


def test_readme_opens_with_install_demo_and_install_tests():
    demo, tests = _commands()[:2]
    assert "pip install torch==2.13.0" in demo and demo.endswith("python -m alignment")
    assert "pip install torch==2.13.0" in tests and 'pip install -e ".[dev,smol]"' in tests and "pytest" in tests


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert _commands()[1] in ci.splitlines()
