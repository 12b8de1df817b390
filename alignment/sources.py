"""Is a model or dataset reference a local path, and is a hub id usable without the network?"""

from __future__ import annotations

from pathlib import Path


def looks_local(reference: str) -> bool:
    return reference.startswith(("/", "./", "../", "~")) or Path(reference).expanduser().exists()


def in_hub_cache(repo_id: str, repo_type: str = "model") -> bool:
    """True when the Hugging Face cache already holds a snapshot of this repository."""
    from huggingface_hub import scan_cache_dir

    try:
        return any(r.repo_id == repo_id and r.repo_type == repo_type for r in scan_cache_dir().repos)
    except Exception:  # no cache directory yet
        return False
