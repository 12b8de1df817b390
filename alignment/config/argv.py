"""The overrides of a command line, told apart from Hydra's flags (read before Hydra starts)."""

from __future__ import annotations


# Hydra flags after which the next argument is a value, not an override.
_FLAGS_WITH_VALUE = {"-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir",
                     "--experimental-rerun", "-c", "--cfg", "-p", "--package"}


# With these, Hydra prints something instead of running; leave them to Hydra.
_INFORMATIONAL = {"-h", "--help", "-hh", "--hydra-help", "--info", "-i", "--cfg", "-c", "-sc",
                  "--shell-completion", "--version"}


def cli_overrides(argv: list[str]) -> list[str] | None:
    """The overrides in a command line, or None when Hydra will only print information."""
    overrides, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        if arg in _INFORMATIONAL:
            return None
        if arg in _FLAGS_WITH_VALUE:
            skip_next = True
            continue
        if arg.startswith("-"):
            continue
        overrides.append(arg)
    return overrides
