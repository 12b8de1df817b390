"""Bad user input: ConfigError (exit 2 with one line, secrets masked) and the two ways to raise it."""

from __future__ import annotations
from alignment.secrets import redact_text


class ConfigError(Exception):
    """Bad user input: the entrypoint prints the message and exits with code 2, before any weights load."""

    def __init__(self, message: object = "", *args: object):

        super().__init__(redact_text(str(message)), *args)


def require(condition: bool, message: str) -> None:
    """Refuse bad input: raise ConfigError(message) unless condition holds."""
    if not condition:
        raise ConfigError(message)


def one_of(key: str, value: object, valid: tuple[str, ...]) -> None:
    require(value in valid, f"{key}={value} is not supported. Valid values: {', '.join(valid)}.")
