"""Cache entries under `$ALIGNMENT_CACHE` that many runs share: built once, verified, never removed under a reader.

An entry (a tiny twin, a converted GGUF checkpoint, a prepared-data dir) is published once:

- **One builder.** Whoever holds the entry's file lock (`.<name>.lock` beside it, the `filelock` package) builds it
  into a staging dir and renames that into place; everyone else waits on the lock and then reuses the entry. A
  published entry is only ever replaced by a holder of the lock that found it failing verification, so two runs
  started together on an empty cache (a team cache, a parallel sweep) build each entry exactly once.
- **A manifest, written last.** `MANIFEST.json` lists every file with its size and sha256; it is written into the
  staging dir after the build, so an entry without one was interrupted (or written by an older version) and is
  rebuilt. Readers check sizes always and hashes on first use in a process.
- **Derived files.** Files that libraries add to an entry later (TRL's tokenized copies and reference log-probs,
  which `datasets` writes beside the prepared splits as `cache-*.arrow`) are listed in `DERIVED.json` by the
  lock holder that wrote them; a derived file that is not listed or does not match is removed under the lock, so
  the library computes it again instead of training on it.
- **Shared permissions.** Entries are made group-readable as the umask allows (a staging dir made by mkdtemp is
  0700; it is opened up before it is published), so colleagues sharing a cache can read what one of them built.

`builds.jsonl` at the cache root gets one line per build (kind, entry, pid, seconds): what was built, by whom.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from alignment.errors import ConfigError

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
DERIVED = "DERIVED.json"
BUILD_LOG = "builds.jsonl"
DERIVED_PATTERN = "*/cache-*.arrow"


class CacheEntryError(ConfigError):
    """A cache entry fails verification and cannot be rebuilt here: the message names it and how to clear it."""


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def shared_mode(directory: bool) -> int:
    """What the umask allows: 0775/0664 under umask 002, 0755/0644 under 022 (group-readable either way)."""
    return (0o777 if directory else 0o666) & ~_umask()


def open_up(root: Path) -> None:
    """Give a staged entry the umask's permissions: mkdtemp makes its dir 0700, which no colleague can read."""
    root.chmod(shared_mode(True))
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod(shared_mode(path.is_dir()))


def entry_lock(entry: Path):
    """The file lock that guards building, verifying and adding to `entry` (beside it, so it survives a rebuild)."""
    from filelock import FileLock

    entry.parent.mkdir(parents=True, exist_ok=True)
    # A group member must be able to open the lock file for writing to take the lock.
    return FileLock(str(entry.parent / f".{entry.name}.lock"), mode=shared_mode(False))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Files whose hash matched in this process, by (path, size, mtime): each is hashed once per process.
_hashed: set[tuple[str, int, int]] = set()


def _file_problem(path: Path, expected: dict, hash_it: bool) -> str | None:
    if not path.is_file():
        return f"{path.name} is missing"
    info = path.stat()
    if info.st_size != expected["bytes"]:
        return f"{path.name} has {info.st_size} bytes, its manifest says {expected['bytes']}"
    key = (str(path), info.st_size, info.st_mtime_ns)
    if hash_it and key not in _hashed:
        if sha256(path) != expected["sha256"]:
            return f"{path.name}'s content does not match its manifest checksum"
        _hashed.add(key)
    return None


def manifest_of(root: Path, files: list[Path]) -> dict:
    return {"version": 1, "files": {str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
                                    for p in sorted(files)}}


def write_manifest(root: Path) -> None:
    """List every file of a staged entry (written last: an entry without it never finished)."""
    files = [p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST]
    _write_json(root / MANIFEST, manifest_of(root, files))


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    tmp.chmod(shared_mode(False))
    os.replace(tmp, path)


def entry_problem(entry: Path, hash_files: bool = True) -> str | None:
    """Why `entry` cannot be used as it is (None when it verifies): absent, unfinished, or not what it was."""
    if not entry.exists():
        return "absent"
    manifest_path = entry / MANIFEST
    if not manifest_path.is_file():
        return f"has no {MANIFEST} (its build was interrupted, or an older version wrote it)"
    try:
        listed = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"has an unreadable {MANIFEST}"
    for relative, expected in listed.items():
        problem = _file_problem(entry / relative, expected, hash_files)
        if problem is not None:
            return problem
    return None


def _discard(entry: Path) -> None:
    """Move a failing entry out of the way, then delete it (a reader holding its files open keeps them)."""
    aside = entry.with_name(f".{entry.name}.discarded-{os.getpid()}-{time.time_ns()}")
    entry.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)


def cache_root() -> Path:
    # Absolute: models built here are the recorded bases of adapters, which must load from any directory.
    return Path(os.environ.get("ALIGNMENT_CACHE", Path.home() / ".cache" / "alignment")).expanduser().resolve()


def record_build(kind: str, entry: Path, seconds: float) -> None:
    """One line per build in builds.jsonl at the cache root (appends of one short line are atomic)."""
    line = json.dumps({"kind": kind, "entry": str(entry), "pid": os.getpid(), "seconds": round(seconds, 3),
                       "at": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n"
    path = cache_root() / BUILD_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, shared_mode(False))
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def cannot_rebuild(kind: str, entry: Path, problem: str, err: BaseException) -> CacheEntryError:
    return CacheEntryError(
        f"the {kind} cache entry {entry} {problem}, and it cannot be rebuilt here ({type(err).__name__}: {err}). "
        f"Clear it with `rm -rf {entry}` (its owner, for a shared cache), or point ALIGNMENT_CACHE at a writable dir.")


def publish_once(entry: Path, build: Callable[[Path], None], kind: str) -> Path:
    """`entry`, verified; built by `build(staging_dir)` under the entry's lock when it is absent or fails verification.

    Waiters reuse what the lock holder published. A failing entry is rebuilt, and the log says why.
    """
    problem = entry_problem(entry)
    if problem is None:
        return entry
    with entry_lock(entry):
        problem = entry_problem(entry)
        if problem is None:  # published by another process while this one waited
            log.info("cache: %s %s built by another process; reused", kind, entry)
            return entry
        started = time.perf_counter()
        try:
            if problem != "absent":
                log.warning("cache: the %s entry %s %s; rebuilding it", kind, entry, problem)
                _discard(entry)
            staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
        except OSError as err:
            raise cannot_rebuild(kind, entry, problem, err) from None
        try:
            build(staging)
            write_manifest(staging)
            open_up(staging)
            staging.rename(entry)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        record_build(kind, entry, time.perf_counter() - started)
    return entry


# ----------------------------------------------------------------------------- derived files


def _derived_listing(entry: Path) -> dict:
    try:
        return json.loads((entry / DERIVED).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def check_derived(entry: Path) -> list[str]:
    """Remove every derived file of `entry` that is not listed in DERIVED.json or does not match it, so the
    library that wrote it computes it again. Call under the entry's lock. Returns what was removed and why."""
    listed = _derived_listing(entry)
    removed = []
    for path in sorted(entry.glob(DERIVED_PATTERN)):
        relative = str(path.relative_to(entry))
        expected = listed.get(relative)
        problem = "is not listed in DERIVED.json" if expected is None else _file_problem(path, expected, True)
        if problem is not None:
            log.warning("cache: %s in %s %s; removed, it is computed again", relative, entry, problem)
            path.unlink()
            listed.pop(relative, None)  # the file computed again is listed afresh
            removed.append(f"{relative}: {problem}")
    missing = [relative for relative in listed if not (entry / relative).exists()]
    for relative in missing:
        listed.pop(relative)
    if removed or missing:
        _write_json(entry / DERIVED, {"version": 1, "files": listed})
    return removed


def list_derived(entry: Path) -> list[str]:
    """Add the derived files written since the last listing to DERIVED.json. Call under the entry's lock."""
    listed = _derived_listing(entry)
    new = [p for p in sorted(entry.glob(DERIVED_PATTERN)) if str(p.relative_to(entry)) not in listed]
    if new:
        for path in new:
            with contextlib.suppress(OSError):
                path.chmod(shared_mode(False))
        listed.update(manifest_of(entry, new)["files"])
        _write_json(entry / DERIVED, {"version": 1, "files": listed})
    return [str(p.relative_to(entry)) for p in new]


@contextlib.contextmanager
def adding_derived_files(entry: Path | None, main_process: bool, kind: str,
                         checked: Callable[[], None] | None = None) -> Iterator[None]:
    """Around a library call that reads and writes `entry`'s derived files: under the entry's lock, unverified
    files are removed first and the new ones listed after. Only the job's main process locks: its other ranks
    follow it inside the library (TRL fills the cache on the main process first, then the others read it).
    `checked`, when given, is called on every rank once the main process has checked the cache (a barrier, for a
    library call whose ranks must all see the same files because they compute together)."""
    if entry is None or not (entry / MANIFEST).exists():
        yield
        return
    if not main_process:
        if checked is not None:
            checked()
        yield
        return
    with entry_lock(entry):
        check_derived(entry)
        if checked is not None:
            checked()
        started = time.perf_counter()
        yield
        for relative in list_derived(entry):
            record_build(kind, entry / relative, time.perf_counter() - started)


def is_group_readable(path: Path) -> bool:
    mode = path.stat().st_mode
    return bool(mode & stat.S_IRGRP) and (not path.is_dir() or bool(mode & stat.S_IXGRP))
