"""What a run dir records about where it came from: the command, the library versions, the project's commit.

Read from package metadata and git, never by importing the libraries (DeepSpeed's import alone prints and costs
seconds). The overrides that composed the run live in config.yaml (`overrides`), which `rerun=` reads.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from functools import lru_cache
from typing import Any

from alignment import __version__
from alignment.config.schema import PACKAGE_DIR
from alignment.config.search_path import search_path

RECORDED_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "deepspeed",
                     "bitsandbytes", "hydra-core", "wandb")


def versions() -> dict[str, str | None]:
    """The project's and the stack's versions (None: not installed)."""
    found: dict[str, str | None] = {"alignment": __version__, "python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    torch = sys.modules.get("torch")
    if torch is not None:  # its own string names the build (2.15.0+cu132, 2.13.0+cpu); the metadata does not
        found["torch"] = torch.__version__
    return found


@lru_cache(maxsize=1)
def project_commit() -> dict[str, Any] | None:
    """The git commit of the project's source tree when it runs from a checkout (editable install); None otherwise."""
    root = PACKAGE_DIR.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        changes = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "uncommitted_changes": bool(changes)}


# The command line as the user typed it, kept in the environment so that launched ranks record the user's command
# rather than their own re-launch line.
COMMAND_ENV = "ALIGNMENT_COMMAND"


def remember_command(argv: list[str]) -> None:
    os.environ.setdefault(COMMAND_ENV, json.dumps({"argv": argv, "cwd": os.getcwd()}))


def command_record() -> dict[str, Any]:
    """How the command was started: its arguments, working dir and the user's config dirs (masked on write)."""

    started = json.loads(os.environ.get(COMMAND_ENV) or "null") or {"argv": sys.argv[1:], "cwd": os.getcwd()}
    return {"line": shlex.join(["python", "-m", "alignment", *started["argv"]]), "cwd": started["cwd"],
            "config_dirs": search_path(), "python": sys.executable}


def provenance() -> dict[str, Any]:
    """The summary.json fields every run dir gets."""
    return {"versions": versions(), "project_commit": project_commit(), "command": command_record()}
