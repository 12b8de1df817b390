"""Gradient checkpointing: model.gradient_checkpointing=true | false | auto, resolved once into the plan.

auto turns it on only when the run does not fit its devices without it: recomputing every layer's activations in
backward costs about a third more compute, which a run that fits should not pay. "Fits" is the memory gate's test
(alignment/plan/gate.py, with its margin) against the same capacity: measured where the run runs, or
launcher.gpu_memory_gb for a dry run (alignment/plan/capacity.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from alignment.config.schema import RunConfig
from alignment.errors import ConfigError
from alignment.plan.capacity import Capacity
from alignment.plan.gate import MEMORY_MARGIN, admits, run_plan, size

SETTINGS = (True, False, "auto")


@dataclass(frozen=True)
class CheckpointingChoice:
    enabled: bool
    reason: str


def check_setting(value: object) -> None:
    if not (isinstance(value, bool) or value == "auto"):
        raise ConfigError(f"model.gradient_checkpointing={value} is not supported. Valid values: true, false, auto "
                          f"(on only when the run does not fit without it).")


def choose_checkpointing(cfg: RunConfig, reference: str, capacity: Capacity) -> CheckpointingChoice:
    setting = cfg.model.gradient_checkpointing
    check_setting(setting)
    if isinstance(setting, bool):
        return CheckpointingChoice(setting, f"model.gradient_checkpointing={str(setting).lower()}")
    without = run_plan(cfg, reference, False, capacity)
    against = f"{size(capacity.bytes_per_device)} per device ({capacity.source})"
    planned = f"{size(without.total)} (+{MEMORY_MARGIN:.0%} margin)"
    fits = admits(without)
    if fits is None:  # the planner does not model this layout's activations, which checkpointing is about
        return CheckpointingChoice(False, f"auto: off; the planner does not model {cfg.model.architecture.model_type} "
                                          f"activations, so cannot tell whether it is needed (set true to recompute "
                                          f"them)")
    if fits:
        return CheckpointingChoice(False, f"auto: off; the run fits without it: {planned} planned within {against}")
    with_it = run_plan(cfg, reference, True, capacity)
    still = "" if admits(with_it) else "; still too large, see the memory gate"
    return CheckpointingChoice(True, f"auto: on; without it {planned} does not fit {against}; with it "
                                     f"{size(with_it.total)}{still}")
