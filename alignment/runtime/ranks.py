"""Which process this is, read from the environment the launcher sets (no torch import needed).

A launched rank finds LAUNCHED_RUN_DIR (set by alignment/launch/launcher.py) and the torchrun variables RANK,
LOCAL_RANK and WORLD_SIZE. Only the global rank 0 writes the run dir's files; every rank trains.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

# Set by the launching parent on every rank: the run dir it chose once for all of them.
LAUNCHED_RUN_DIR = "ALIGNMENT_LAUNCHED_RUN_DIR"
# Set when the command started (and kept across a re-launch): rank 0 reports command → first step.
LAUNCH_STARTED = "ALIGNMENT_LAUNCH_STARTED"


def launched_run_dir() -> str | None:
    return os.environ.get(LAUNCHED_RUN_DIR) or None


def started_by_external_launcher() -> bool:
    """A rank that `accelerate launch` or torchrun started directly (launch/accelerate.yaml used as-is), not one
    of ours: the launcher set the process-group variables, we did not set the run dir."""
    return launched_run_dir() is None and "LOCAL_RANK" in os.environ and world_size() > 1


def world_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return world_rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextmanager
def main_process_first():
    """Rank 0 runs the block first (and fills caches); the others wait, then run it and find the caches filled."""
    if not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_main_process():
            barrier()


def init_process_group(use_cuda: bool) -> None:
    """Join the launched job's process group early, so data preparation can wait on rank 0.

    accelerate's shared state is what transformers' Trainer later reuses; gloo on CPU, NCCL on GPU.
    """
    if world_size() <= 1:
        return
    from accelerate import PartialState

    PartialState(cpu=not use_cuda)


def shutdown_process_group() -> None:
    """Barrier, then destroy the group: without it a ZeRO-3 rank can abort at interpreter exit (known hang)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
