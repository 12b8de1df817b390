"""Cache entries built once: into a temporary sibling dir, renamed into place only when complete.

An interrupted build is never reused (its staging dir is removed, or left under a dot-name that no reader
looks at), and when two processes build the same entry the second finds the first's in place and keeps it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable


def build_once(target: Path, build: Callable[[Path], None], complete_marker: str = "config.json") -> Path:
    """`target`, built by `build(staging_dir)` unless it already holds `complete_marker`."""
    if (target / complete_marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished the same build first: theirs is identical
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
