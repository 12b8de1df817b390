"""Whether a run may contact a hub."""

from __future__ import annotations
import os
from alignment.config.schema import RunConfig


def is_offline(cfg: RunConfig) -> bool:
    return cfg.offline or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
