"""Batch arithmetic from one source: global batch = micro batch × gradient accumulation × processes.

The stage names the global batch (the recipe's number, e.g. Zephyr's 512 for SFT and 32 for DPO) and the
micro batch each process holds; accumulation is derived. Moving a recipe from 8 GPUs to 2 therefore keeps
its global batch (and its learning-rate schedule) instead of silently quartering it.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignment.errors import ConfigError
from alignment.config.schema import RunConfig


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    micro_batch: int
    processes: int
    accumulation: int

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = micro batch {self.micro_batch} × accumulation "
                f"{self.accumulation} × {self.processes} process{'es' if self.processes > 1 else ''}")


def batch_plan(cfg: RunConfig, processes: int) -> BatchPlan:
    """Derive gradient accumulation; a global batch that does not split evenly is refused with the nearest fixes."""
    micro = cfg.stage.per_device_train_batch_size
    target = cfg.stage.global_batch_size
    if target is None:
        return BatchPlan(micro * processes, micro, processes, 1)
    if target < 1:
        raise ConfigError(f"stage.global_batch_size must be >= 1 or null (got {target}).")
    per_step = micro * processes
    if target % per_step == 0:
        return BatchPlan(target, micro, processes, target // per_step)
    raise ConfigError(_not_divisible(target, micro, processes))


def _not_divisible(target: int, micro: int, processes: int) -> str:
    per_step = micro * processes
    lower, upper = (target // per_step) * per_step, (target // per_step + 1) * per_step
    fixes = [f"stage.global_batch_size={g}" for g in (lower, upper) if g >= 1]
    if target % processes == 0:
        per_process = target // processes
        micros = [m for m in range(1, per_process + 1) if per_process % m == 0]
        nearest = sorted(micros, key=lambda m: (abs(m - micro), -m))[:2]
        fixes += [f"stage.per_device_train_batch_size={m}" for m in sorted(nearest)]
    else:
        counts = [n for n in range(1, target + 1) if target % (micro * n) == 0]
        nearest = sorted(counts, key=lambda n: abs(n - processes))[:2]
        fixes += [f"launcher.num_processes={n}" for n in sorted(nearest)]
    return (f"stage.global_batch_size={target} does not split into micro batches of "
            f"{micro} (stage.per_device_train_batch_size) on {processes} process{'es' if processes > 1 else ''}: "
            f"{target} is not a multiple of {micro} × {processes} = {per_step}. Nearest valid settings: "
            f"{', '.join(fixes)}.")


def batching_strategy(stage) -> str:
    """length | random | packed: the order a run's training examples are drawn in (stage.batching resolved)."""
    packed = bool(getattr(stage, "packing", False))
    if stage.batching == "length" and packed:
        raise ConfigError("stage.batching=length has no effect with stage.packing=true: packed rows all hold "
                          "max_length tokens. Drop stage.batching (auto) or set stage.packing=false.")
    if stage.batching == "auto":
        return "packed" if packed else "length"
    return stage.batching
