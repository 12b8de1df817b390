"""Settings that name secrets: `*_env` keys name a variable and never hold a key; `${secret:NAME}`."""

from __future__ import annotations
import dataclasses
import os
from typing import Any
from alignment.secrets import _ENV_NAME, contains_secret, declare_secret_env, env_name_problem
from alignment.errors import ConfigError


def check_env_name(key: str, value: str, example: str = "MY_SECRET") -> None:
    """Refuse a `*_env` value that is not a variable name; the value itself is never repeated (it may be a key)."""

    problem = env_name_problem(value)
    if problem:
        raise ConfigError(f"{key} {problem} (the value is not shown). A setting that takes a secret names the "
                          f"variable that holds it, so the secret is never written to config.yaml, the sweep dir's "
                          f"name or a tracker: `export {example}=<the key>`, then {key}={example}.")


def env_settings(obj: Any, prefix: str = "") -> list[tuple[str, str | None, str]]:
    """Every `*_env` setting of a RunConfig: (dotted key, value, an example variable name)."""
    found = []
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            found += env_settings(value, f"{key}.")
        elif f.name.endswith("_env") and (value is None or isinstance(value, str)):
            default = f.default if isinstance(f.default, str) and _ENV_NAME.match(f.default) else None
            found.append((key, value, default or f.name[:-len("_env")].upper()))
    return found


# Settings that name things (dirs, tracker runs): a key pasted there would end up in a directory name.
_NAME_SETTINGS = ("run_name", "tracker.project", "tracker.entity")


def check_secret_settings(cfg: Any) -> None:
    """Validation (alignment/preflight/validation.py), before anything is written: every `*_env` setting holds a variable's
    name (whose value is then masked everywhere), and no setting that names a dir or a run holds a secret."""

    for key, value, example in env_settings(cfg):
        if value:
            check_env_name(key, value, example)
            declare_secret_env(value)
    for key in _NAME_SETTINGS:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part, None)
        if isinstance(value, str) and contains_secret(value):
            raise ConfigError(f"{key} holds a secret (a key, a password or a secret variable's value; not shown): "
                              f"it would name directories and tracker runs. Choose a plain name.")


def read_secret_env(key: str, name: str, otherwise: str = "") -> str:
    """The secret in the variable a setting names (`key`=`name`), read where it is needed; refused when unset.

    otherwise: what else the user may do, e.g. "or eval.judge.api_key_env=null for a server that takes no key".
    """
    check_env_name(key, name)
    return _read_env(f"{key}={name}", name, otherwise)


def _read_env(where: str, name: str, otherwise: str = "") -> str:

    value = os.environ.get(name)
    if not value:
        raise ConfigError(f"{where}: the environment variable {name} is not set. Set it before the command "
                          f"(`export {name}=<the secret>`){', ' + otherwise if otherwise else ''}; the secret is "
                          f"read from there and never written anywhere.")
    declare_secret_env(name)
    return value


def secret_interpolation(name: str) -> str:
    """`${secret:NAME}` in any setting: the value of the variable NAME, read at composition. The command line, the
    sweep dir's name and Hydra's files keep `${secret:NAME}`; the value is masked wherever it would be written."""

    problem = env_name_problem(str(name))
    if problem:  # the value is not repeated: it may be the key itself
        raise ConfigError(f"${{secret:...}} {problem} (the value is not shown). Write ${{secret:NAME}} with the name "
                          f"of the variable that holds the secret, e.g. `export JUDGE_PASSWORD=<it>`, then "
                          f"'${{secret:JUDGE_PASSWORD}}' (single-quoted, so the shell leaves it alone).")
    return _read_env(f"${{secret:{name}}}", name)
