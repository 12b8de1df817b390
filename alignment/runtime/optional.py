"""Optional packages (DeepSpeed, bitsandbytes, trackers, lm-eval): imported up front, so a run that needs one and cannot
load it is refused before any work starts, with what to install or choose instead."""

from __future__ import annotations

import importlib
import sys
from typing import Iterable

from alignment.errors import ConfigError
from alignment.config.schema import RunConfig


def require_importable(module: str, needed_for: str, remedy: str) -> None:
    """Import `module`, or raise ConfigError: "<needed_for>, and it cannot be imported (<error>). <remedy>"."""
    try:
        importlib.import_module(module)
    except Exception as err:  # ImportError, or a build whose native library does not load on this machine
        raise ConfigError(f"{needed_for}, and it cannot be imported ({type(err).__name__}: {err}). {remedy}") from None


# Heavy stacks that transformers, accelerate, peft and TRL import merely because they are installed (accelerate
# imports DeepSpeed, which prints "Setting accelerator to CPU"; peft imports bitsandbytes; TRL imports W&B).
# Each is needed only by the runs that choose it.
def stacks_used(cfg: RunConfig) -> set[str]:
    used = set()
    if cfg.backend.name == "zero3":
        used.add("deepspeed")
    if cfg.peft.method == "qlora":
        used.add("bitsandbytes")
    if cfg.tracker.name == "wandb":
        used.add("wandb")
    return used


HEAVY_STACKS = ("deepspeed", "bitsandbytes", "wandb")


def hide_unused_stacks(configs: Iterable[RunConfig]) -> list[str]:
    """Make the heavy stacks that no run of this command uses look absent to every library in this process.

    A `None` entry in sys.modules is Python's documented way to block an import: `import deepspeed` raises
    ImportError and `importlib.util.find_spec("deepspeed")` returns None, so the libraries' is-it-installed checks
    answer "no" and skip it. Ranks and sweep members decide again in their own processes. Returns what was hidden."""
    used = set().union(*(stacks_used(cfg) for cfg in configs))
    hidden = [name for name in HEAVY_STACKS if name not in used and name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    return hidden
