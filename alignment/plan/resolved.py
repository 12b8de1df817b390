"""The decisions a run makes from its configuration, made once and carried everywhere.

`resolve_plan(cfg, previous)` is called by preflight for every member and chain link of a command, after
validation; the dry run prints it, the launching process writes it to `<run dir>/plan.json` for its ranks, the stage
builds its trainer from it, and summary.json records it. Nothing downstream derives these again: `plan_of(cfg)`
returns the plan preflight made for that configuration (a rank reads the launcher's plan.json), and computes it only
for a configuration no preflight saw (the Python API, a rank started by hand).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from alignment.plan.batch import BatchPlan, batch_plan, batching_strategy
from alignment.plan.capacity import capacity_for
from alignment.plan.checkpointing import CheckpointingChoice, choose_checkpointing
from alignment.plan.gate import MemoryCheck, memory_check, run_plan
from alignment.config.schema import RunConfig, as_dict
from alignment.plan.processes import resolve_launcher
from alignment.models.modeling import mixed_precision
from alignment.runtime.ranks import launched_run_dir
from alignment.plan.reference import ReferenceChoice, choose_reference
from alignment.config.registry import stage_of
from alignment.models.start import keeps_parent_adapter, parent_is_adapter

PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class ResolvedPlan:
    stage: str                  # the registered stage's name
    trainer: str                # the class that trains (the registry's Stage.trainer)
    processes: int              # over all machines: launcher.num_processes, or what the visible devices give
    machines: int
    batch: Optional[BatchPlan]  # global = micro × accumulation × processes; None: the stage trains nothing
    reference: Optional[ReferenceChoice]  # the reference option with its reason; None: a reference-free stage
    precision: str              # bf16 | fp16 | no (backend.mixed_precision=auto resolved for this machine)
    attention: str              # the implementation asked for (a fallback at load time is recorded by the runner)
    adapter_kept: bool          # the policy starts from the parent's LoRA adapter (trained further)
    # stage.batching resolved (alignment/stages/batching.py): length | random | packed; None: the stage trains nothing.
    batching: Optional[str] = None
    # model.gradient_checkpointing resolved (auto: on only when the run does not fit without it), and why.
    gradient_checkpointing: bool = False
    gradient_checkpointing_reason: str = ""
    # The plan's bytes per device against the memory free where it runs (measured; a dry run: launcher.gpu_memory_gb):
    # what the memory gate acts on before any weight loads. None: the stage trains nothing.
    memory_gate: Optional[MemoryCheck] = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ResolvedPlan":
        batch = BatchPlan(**data["batch"]) if data.get("batch") else None
        reference = ReferenceChoice(**data["reference"]) if data.get("reference") else None
        memory = MemoryCheck(**data["memory_gate"]) if data.get("memory_gate") else None
        return cls(**{**data, "batch": batch, "reference": reference, "memory_gate": memory})


def resolve_plan(cfg: RunConfig, previous: RunConfig | None = None) -> ResolvedPlan:
    """Every decision, from the configuration (and the parent run on disk); ConfigError when one cannot be made."""
    stage = stage_of(cfg)
    launcher = resolve_launcher(cfg).launcher
    adapter_kept = keeps_parent_adapter(cfg, parent_is_adapter(cfg, previous))
    reference = choose_reference(cfg, adapter_kept) if stage.reference else None
    checkpointing, memory = _memory_decisions(resolve_launcher(cfg), reference)
    plan = ResolvedPlan(
        stage=stage.name, trainer=stage.trainer, processes=launcher.num_processes, machines=launcher.num_machines,
        batch=batch_plan(cfg, launcher.num_processes) if stage.trains else None, reference=reference,
        precision=mixed_precision(cfg), attention=cfg.model.attn_implementation, adapter_kept=adapter_kept,
        gradient_checkpointing=checkpointing.enabled, gradient_checkpointing_reason=checkpointing.reason,
        memory_gate=memory, batching=batching_strategy(cfg.stage) if stage.trains else None)
    _PLANS[_key(cfg)] = plan
    return plan


def _memory_decisions(cfg: RunConfig, reference: ReferenceChoice | None
                      ) -> tuple[CheckpointingChoice, MemoryCheck | None]:
    """Checkpointing (auto: against the capacity) and the plan's total against the capacity, for the memory gate."""
    if not stage_of(cfg).trains:
        return CheckpointingChoice(False, "the stage trains nothing"), None
    recorded = _launchers_plan(cfg)
    if recorded is not None:  # a launched rank: its launching process measured the devices before starting it
        return (CheckpointingChoice(recorded.gradient_checkpointing, recorded.gradient_checkpointing_reason),
                recorded.memory_gate)
    capacity = capacity_for(cfg)
    option = reference.option if reference else "base"
    choice = choose_checkpointing(cfg, option, capacity)
    return choice, memory_check(run_plan(cfg, option, choice.enabled, capacity), capacity)


def _launchers_plan(cfg: RunConfig) -> ResolvedPlan | None:
    """In a launched rank, the plan its launching process wrote into the run dir (None elsewhere)."""
    if launched_run_dir() is None or not cfg.run_dir or not (Path(cfg.run_dir) / PLAN_FILE).exists():
        return None
    return ResolvedPlan.from_dict(json.loads((Path(cfg.run_dir) / PLAN_FILE).read_text()))


# The plans this process resolved, by what decides them: a run's own dir, resume flag or recorded overrides do not.
_PLANS: dict[str, ResolvedPlan] = {}
_NOT_DECIDING = ("run_dir", "resume", "overrides", "dry_run", "data_report", "chain")


def _key(cfg: RunConfig) -> str:
    tree = {k: v for k, v in as_dict(cfg).items() if k not in _NOT_DECIDING}
    return json.dumps(tree, sort_keys=True, default=str)


def plan_of(cfg: RunConfig, previous: RunConfig | None = None) -> ResolvedPlan:
    """The plan preflight resolved for this configuration; a launched rank reads its launcher's plan.json."""
    found = _PLANS.get(_key(cfg))
    if found is not None:
        return found
    plan = _launchers_plan(cfg)
    if plan is not None:
        _PLANS[_key(cfg)] = plan
        return plan
    return resolve_plan(cfg, previous)


def write_plan(run_dir: Path, plan: ResolvedPlan) -> Path:
    """The launching process's plan, for its ranks (and the record)."""
    path = run_dir / PLAN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan.as_dict(), indent=2) + "\n")
    return path
