"""The user's config dirs, kept in the environment so that ranks, sweep members and SLURM jobs compose with them too."""

from __future__ import annotations
import json
import os


# The user's config dirs (-cd/--config-dir, hydra.searchpath), as Hydra search-path entries. Kept in the
# environment, so that launched ranks, sweep members and SLURM jobs of the command compose with the same path.
SEARCH_PATH_ENV = "ALIGNMENT_CONFIG_SEARCHPATH"


def search_path() -> list[str]:
    return json.loads(os.environ.get(SEARCH_PATH_ENV) or "[]")


def set_search_path(entries: list[str]) -> None:
    if entries:
        os.environ[SEARCH_PATH_ENV] = json.dumps(entries)
    else:
        os.environ.pop(SEARCH_PATH_ENV, None)
