"""Keep secrets out of everything we write and show: files, directory names, trackers, the console.

Where a secret comes from, and how it is kept out:

- The environment (HF_TOKEN, WANDB_API_KEY, OPENAI_API_KEY, ...): the values of variables with secret-looking
  names, and of every variable a setting names (`*_env` settings, `${secret:NAME}`), are replaced wherever they
  appear in a string we write.
- A setting that takes a secret names the environment variable holding it: `eval.judge.api_key_env=OPENAI_API_KEY`
  (every `*_env` setting; `check_secret_settings` refuses a value that is not a variable name or looks like a key,
  before anything is written). Any other string setting can hold `${secret:NAME}`, read from the environment when
  the config is composed: the command line, the sweep dir's name and Hydra's files keep the reference, never the
  value, and the value is masked wherever it would be written.
- A secret typed into an override value (`eval.judge.url=https://user:PASSWORD@host/v1`) is recognised by its
  shape and masked: a URL's password, keys of well-known shapes (sk-..., hf_..., ghp_..., AKIA..., JWTs, Bearer
  tokens) and the value of a secret-looking key (`hub.token=...`, `?api_key=...`). Hashes we write on purpose
  (cache keys, commit ids) have none of these shapes and are left alone.

The masking reaches Hydra's own outputs too: its console lines (the logging filter below, installed on the
console handlers by alignment/conf/hydra/{job,hydra}_logging/masked.yaml), `multirun.yaml` and any `.hydra/`
copies (`MaskHydraOutputs`, a Hydra callback), the sweep dir's name (alignment/sweep/sweeps.py) and the tracker's run
name and config (alignment/records/trackers.py).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any
from urllib.parse import urlparse

from hydra.experimental.callback import Callback

MASK = "***"
# Matched on the last word(s) of a key (hf_token, WANDB_API_KEY, db.password) so that `tokenizer`,
# `max_new_tokens` or `mean_token_accuracy` are not taken for secrets.
_SECRET_WORDS = {"token", "secret", "password", "passwd", "apikey", "credential", "credentials"}
_TOKENIZER_TOKENS = {"pad", "eos", "bos", "unk", "sep", "cls", "mask"}
# Shorter values would mask innocent substrings (a token "abc" inside "abcd").
_MIN_SECRET_LENGTH = 8
# Variables a setting names hold a secret by declaration, whatever their name: shorter values count too.
_MIN_DECLARED_LENGTH = 4
# The names of the variables settings named (`*_env`, `${secret:NAME}`), inherited by launched ranks.
SECRET_NAMES_ENV = "ALIGNMENT_SECRET_ENV_NAMES"

# Credentials of well-known shapes: a fixed prefix and a long random tail. Deliberately no bare hex or base64
# runs: cache keys, fingerprints and commit ids we write on purpose look like those.
KEY_SHAPES = re.compile(
    r"(?<![A-Za-z0-9])(?:"
    r"sk-[A-Za-z0-9_-]{20,}"                      # OpenAI, Anthropic (sk-ant-...), most OpenAI-compatible APIs
    r"|hf_[A-Za-z0-9]{20,}"                       # Hugging Face
    r"|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"  # GitHub
    r"|glpat-[A-Za-z0-9_-]{20,}"                  # GitLab
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"             # Slack
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"                 # AWS access key ids
    r"|AIza[0-9A-Za-z_-]{35}"                     # Google API keys
    r"|eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWTs
    r")")
_BEARER = re.compile(r"(?P<head>\bBearer\s+)(?P<secret>[A-Za-z0-9._~+/=-]{8,})")
# scheme://user:PASSWORD@host, also as Hydra prints overrides (`https\://user\:PASSWORD@host`). A `${...}`
# password is an interpolation (`${secret:NAME}`), not a secret.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*\\?:(?:\\?/){2}[^\s/@:'\"\\]*\\?:)"
                           r"(?!\$\{)(?P<secret>[^\s/@'\"]+)(?=@)")
# key=value in an override, a shell line or a URL query: the value is masked when the key is secret-looking.
_ASSIGNMENT = re.compile(r"(?<![\w.\-/])(?P<key>[+~]*[A-Za-z_][\w.\-]*)="
                         r"(?:(?P<quote>['\"])(?!\$\{)[^'\"]+(?P=quote)|(?!\$\{)[^\s'\"&#]+)")
_QUERY_SECRETS = {"key", "sig", "signature", "auth"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


def _words(key: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", key.lower()) if w]


def is_secret_key(key: str) -> bool:
    words = _words(key)
    if words[-2:-1] and words[-1] == "token" and words[-2] in _TOKENIZER_TOKENS:
        return False  # pad_token, eos_token, ...: vocabulary entries, not credentials
    return bool(words) and (words[-1] in _SECRET_WORDS or "".join(words[-2:]) in _SECRET_WORDS)


def is_secret_env_name(name: str, declared: set[str] | None = None) -> bool:
    """Variables whose values are masked wherever they appear: secret-looking names (…_KEY too: AWS_SECRET_ACCESS_KEY)
    and every variable a setting named."""
    declared = declared_secret_names() if declared is None else declared
    return is_secret_key(name) or _words(name)[-1:] in (["key"], ["keys"]) or name in declared


def declared_secret_names() -> set[str]:
    return {n for n in os.environ.get(SECRET_NAMES_ENV, "").split(",") if n}


def declare_secret_env(name: str) -> None:
    """The variable `name` holds a secret (a setting named it): its value is masked like HF_TOKEN's, in this process
    and in the ranks it launches."""
    names = declared_secret_names()
    if name not in names:
        os.environ[SECRET_NAMES_ENV] = ",".join(sorted(names | {name}))


_NAMED_IN_OVERRIDE = re.compile(r"_env=['\"]?([A-Za-z_][A-Za-z0-9_]*)['\"]?$|\$\{secret:([A-Za-z_][A-Za-z0-9_]*)\}")


def declare_named_in(overrides: list[str]) -> None:
    """Declare the variables a command line's `*_env=NAME` and `${secret:NAME}` name, before validation does: the
    sweep dir's name is made from the command line first (alignment/sweep/sweeps.py)."""
    for override in overrides:
        for match in _NAMED_IN_OVERRIDE.finditer(str(override)):
            name = match[1] or match[2]
            if env_name_problem(name) is None:
                declare_secret_env(name)


def secret_env_values() -> list[str]:
    declared = declared_secret_names()
    values = [v for k, v in os.environ.items()
              if (k in declared and len(v) >= _MIN_DECLARED_LENGTH)
              or (len(v) >= _MIN_SECRET_LENGTH and is_secret_env_name(k, declared))]
    return sorted(set(values), key=len, reverse=True)


def _mask_assignment(match: re.Match) -> str:
    key = match["key"].lstrip("+~")
    if is_secret_key(key) or key.lower() in _QUERY_SECRETS:
        quote = match["quote"] or ""
        return f"{match['key']}={quote}{MASK}{quote}"
    return match[0]


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    """The text with every secret masked: environment secrets, URL passwords, keys of known shapes, values of
    secret-looking keys."""
    for secret in secret_env_values() if secrets is None else secrets:
        text = text.replace(secret, MASK)
    text = _URL_PASSWORD.sub(lambda m: m["head"] + MASK, text)
    text = KEY_SHAPES.sub(MASK, text)
    text = _BEARER.sub(lambda m: m["head"] + MASK, text)
    return _ASSIGNMENT.sub(_mask_assignment, text)


def contains_secret(text: str) -> bool:
    return redact_text(text) != text


def redact(obj: Any, secrets: list[str] | None = None) -> Any:
    """A copy of a nested dict/list structure with secret keys masked and secret values removed.

    A `*_env` setting holds a variable's name; a value that is no variable name, or looks like a key, is masked.
    """
    secrets = secret_env_values() if secrets is None else secrets
    if isinstance(obj, dict):
        return {k: (MASK if isinstance(k, str) and _masked_whole(k, v) else redact(v, secrets)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, secrets) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    return obj


def _masked_whole(key: str, value: Any) -> bool:
    if value in (None, ""):
        return False
    if is_secret_key(key):
        return True
    return key.endswith("_env") and isinstance(value, str) and env_name_problem(value) is not None


# ------------------------------------------------------------------ settings that take a secret: a variable's name


def looks_like_key(value: str) -> bool:
    """A credential rather than a name: a known key shape, a secret value from the environment, or a long run of
    mixed letters and digits (names are words: OPENAI_API_KEY, MY_JUDGE_KEY_2)."""
    if contains_secret(value):
        return True
    for part in re.split(r"[^A-Za-z0-9]+", value):
        digits = sum(c.isdigit() for c in part)
        mixed_case = any(c.islower() for c in part) and any(c.isupper() for c in part)
        if len(part) >= 32 or (len(part) >= 16 and digits and (mixed_case or digits >= 4)):
            return True
    return False


def env_name_problem(value: str) -> str | None:
    """Why `value` cannot be the name of an environment variable holding a secret; None when it can."""
    if looks_like_key(value):
        return "holds what looks like a key, not the name of an environment variable"
    if not _ENV_NAME.match(value):
        return "is not the name of an environment variable (letters, digits and _, not starting with a digit)"
    return None


def is_local_url(url: str | None) -> bool:
    """A server on this machine (a local vLLM, a test stub), which may take no key."""
    try:
        return (urlparse(url or "").hostname or "") in _LOCAL_HOSTS
    except ValueError:
        return False


# ------------------------------------------------------------------ the console and Hydra's own files


class RedactingFilter(logging.Filter):
    """Rewrites every record's final message (and traceback) so no handler after it ever sees a secret.

    On run.log's handler (alignment/records/tracking.py) and on the console handlers of Hydra's logging configs
    (alignment/conf/hydra/job_logging/masked.yaml, hydra_logging/masked.yaml): Hydra's `#0 : <overrides>` lines
    and every log line of a run.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
            cleaned = redact_text(message)
            if cleaned != message:
                record.msg, record.args = cleaned, ()
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = redact_text(record.exc_text)
            if record.stack_info:
                record.stack_info = redact_text(record.stack_info)
        except Exception:  # a malformed record is the handler's to report, never the filter's to raise
            pass
        return True


def masked_omegaconf(config: Any, resolve: bool = False) -> Any:
    """An OmegaConf copy of `config` with secrets masked, interpolations kept (`${secret:NAME}` stays a reference)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if not isinstance(config, (DictConfig, ListConfig)):
        config = OmegaConf.create(config)
    return OmegaConf.create(redact(OmegaConf.to_container(config, resolve=resolve)))


def mask_hydra_writes() -> None:
    """Hydra writes the composed config with the raw command line in it: `multirun.yaml` into the sweep dir (its
    sweepers save through OmegaConf.save, optuna's results too) and, when hydra.output_subdir is set, `.hydra/`
    copies per job (hydra.core.utils._save_config). Both are replaced, once per process, by writers that mask."""
    import hydra.core.utils as hydra_utils
    from omegaconf import OmegaConf

    if getattr(OmegaConf.save, "masks_secrets", False):
        return
    original_save = OmegaConf.save

    def save(config: Any, f: Any, resolve: bool = False) -> None:
        original_save(masked_omegaconf(config, resolve), f, resolve=False)

    def save_config(cfg: Any, filename: str, output_dir: Any) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        with open(output_dir / filename, "w", encoding="utf-8") as file:
            file.write(OmegaConf.to_yaml(masked_omegaconf(cfg)))

    save.masks_secrets = True  # type: ignore[attr-defined]
    OmegaConf.save = staticmethod(save)  # type: ignore[method-assign,assignment]
    hydra_utils._save_config = save_config


class MaskHydraOutputs(Callback):
    """Hydra callback (alignment/conf/config.yaml): before Hydra writes anything, its writers mask secrets."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        mask_hydra_writes()

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        mask_hydra_writes()
