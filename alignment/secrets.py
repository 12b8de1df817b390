"""Keep secrets out of everything we write: config.yaml, summary.json, run.log, the console.

Secrets come from the environment only (HF_TOKEN, WANDB_API_KEY, ...). Before anything is written,
values under secret-looking keys are masked, and any occurrence of a secret environment value inside
another string (a URL with a token in it, an override on the command line) is replaced as well.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

MASK = "***"
# Matched on the last word(s) of a key (hf_token, WANDB_API_KEY, db.password) so that `tokenizer`,
# `max_new_tokens` or `mean_token_accuracy` are not taken for secrets.
_SECRET_WORDS = {"token", "secret", "password", "passwd", "apikey", "credential", "credentials"}
_TOKENIZER_TOKENS = {"pad", "eos", "bos", "unk", "sep", "cls", "mask"}
# Shorter values would mask innocent substrings (a token "abc" inside "abcd").
_MIN_SECRET_LENGTH = 8


def is_secret_key(key: str) -> bool:
    words = [w for w in re.split(r"[^a-z0-9]+", key.lower()) if w]
    if words[-2:-1] and words[-1] == "token" and words[-2] in _TOKENIZER_TOKENS:
        return False  # pad_token, eos_token, ...: vocabulary entries, not credentials
    return bool(words) and (words[-1] in _SECRET_WORDS or "".join(words[-2:]) in _SECRET_WORDS)


def secret_env_values() -> list[str]:
    values = [v for k, v in os.environ.items() if is_secret_key(k) and len(v) >= _MIN_SECRET_LENGTH]
    return sorted(set(values), key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    for secret in secret_env_values() if secrets is None else secrets:
        text = text.replace(secret, MASK)
    return text


def redact(obj: Any, secrets: list[str] | None = None) -> Any:
    """A copy of a nested dict/list structure with secret keys masked and secret values removed."""
    secrets = secret_env_values() if secrets is None else secrets
    if isinstance(obj, dict):
        return {
            k: (MASK if isinstance(k, str) and is_secret_key(k) and v not in (None, "") else redact(v, secrets))
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [redact(v, secrets) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    return obj


class RedactingFilter(logging.Filter):
    """Rewrites every record's final message so no handler ever sees a secret value."""

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = secret_env_values()
        if secrets:
            record.msg = redact_text(record.getMessage(), secrets)
            record.args = ()
        return True
