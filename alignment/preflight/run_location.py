"""Where a run dir goes: refused before anything is written (a file, unwritable, read-only, too little room)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from alignment.errors import ConfigError, require
from alignment.config.schema import RunConfig
from alignment.records.rundir import OUTPUTS_ROOT
from alignment.config.registry import stage_of


# ------------------------------------------------------------------------------------------------------------------
# The run dir's place: refused before anything is written, and nothing is created to find out.
# ------------------------------------------------------------------------------------------------------------------

MIN_RUN_BYTES = 32 * 2**20  # config, logs, metrics, plots, data report: what every run writes besides weights


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def parameter_floor(cfg: RunConfig) -> int:
    """A lower bound on the model's parameter count from its architecture facts alone (nothing is built): the
    attention and MLP weights of every layer (an ungated MLP, the smaller kind) and one embedding matrix."""
    arch = cfg.model.architecture
    head_dim = arch.head_dim or arch.hidden_size // arch.num_attention_heads
    attention = 2 * arch.hidden_size * head_dim * (arch.num_attention_heads + arch.num_key_value_heads)
    return arch.num_hidden_layers * (attention + 2 * arch.hidden_size * arch.intermediate_size) \
        + arch.vocab_size * arch.hidden_size


def bytes_written_at_least(cfg: RunConfig) -> tuple[int, str]:
    """A conservative (low) estimate of what the run writes into its dir, and what that is made of."""
    if cfg.data_report:
        return MIN_RUN_BYTES, "its records and data report"
    if not stage_of(cfg).trains or cfg.peft.method != "none":
        return MIN_RUN_BYTES, "its records (an adapter or an evaluation adds little)"
    width = {"float32": 4}.get(cfg.model.dtype, 2)
    weights = parameter_floor(cfg) * width
    checkpoints = 1 if cfg.stage.max_steps == -1 or cfg.stage.save_steps <= cfg.stage.max_steps else 0
    what = (f"the trained model ({_size(weights)}: at least {_count(parameter_floor(cfg))} parameters at {width} "
            f"bytes)" + (", the same again in a checkpoint" if checkpoints else "") + " and its records")
    return weights * (1 + checkpoints) + MIN_RUN_BYTES, what


def check_run_location(cfg: RunConfig) -> None:
    """run_dir (or, unset, outputs/ under the working dir) can be created and written, with room for the run.

    The free-space check is skipped under dry_run=true: a plan is often made on another machine than the run's, and
    it prints what the run will write.
    """
    path = Path(cfg.run_dir) if cfg.run_dir else OUTPUTS_ROOT
    key = f"run_dir={cfg.run_dir}" if cfg.run_dir else f"run_dir (unset: a new dir under {Path.cwd() / OUTPUTS_ROOT})"
    try:
        require(not path.exists() or path.is_dir(), f"{key} is a file, not a directory. Choose another run_dir.")
        anchor = path
        while not anchor.exists() and anchor != anchor.parent:
            anchor = anchor.parent
    except OSError as err:  # a parent that cannot be searched
        raise ConfigError(f"{key} cannot be reached ({err.strerror}: {err.filename}). Choose another run_dir.") from None
    require(anchor.is_dir(), f"{key} cannot be created: {anchor} is a file, not a directory. Choose another run_dir.")
    read_only = bool(os.statvfs(anchor).f_flag & os.ST_RDONLY)
    require(not read_only, f"{key} is on a read-only filesystem ({anchor}). Choose a run_dir on a writable one.")
    require(os.access(anchor, os.W_OK | os.X_OK),
             f"{key} cannot be written: {anchor} is not writable by this user. Choose another run_dir, or make "
             f"{anchor} writable.")
    if cfg.dry_run:
        return
    needed, what = bytes_written_at_least(cfg)
    free = shutil.disk_usage(anchor).free
    require(free >= needed, f"{key} has {_size(free)} free on its filesystem ({anchor}), but this run writes at least "
                             f"{_size(needed)}: {what}. Free space, or choose a run_dir on a larger filesystem.")
