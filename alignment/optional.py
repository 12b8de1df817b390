"""Optional packages (DeepSpeed, bitsandbytes, trackers, lm-eval): imported up front, so a run that needs one and cannot
load it is refused before any work starts, with what to install or choose instead."""

from __future__ import annotations

import importlib

from .config import ConfigError


def require_importable(module: str, needed_for: str, remedy: str) -> None:
    """Import `module`, or raise ConfigError: "<needed_for>, and it cannot be imported (<error>). <remedy>"."""
    try:
        importlib.import_module(module)
    except Exception as err:  # ImportError, or a build whose native library does not load on this machine
        raise ConfigError(f"{needed_for}, and it cannot be imported ({type(err).__name__}: {err}). {remedy}") from None
