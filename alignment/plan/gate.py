"""The memory gate: a run whose plan does not fit the memory free where it runs is refused before any weight loads
and before any rank starts (or, with launcher.memory_gate=warn, warned about).

The check itself (planned bytes per device against the capacity, with MEMORY_MARGIN) is made once, when the plan is
resolved (alignment/plan/resolved.py `memory_gate`), so that the dry run, plan.json and summary.json carry the same
numbers the gate acts on. `enforce` acts on it: validation calls it (alignment/preflight/validation.py), so the
command's preflight refuses before Hydra starts, and the runner's validation of each link again right before it
launches ranks or builds a trainer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import yaml

from alignment.config.schema import PACKAGE_DIR, RunConfig
from alignment.config.search_path import search_path
from alignment.errors import ConfigError
from alignment.plan.capacity import Capacity
from alignment.plan.memory import GB, MemoryPlan, plan_inputs, plan_memory, run_dtype
from alignment.plan.processes import resolve_launcher

log = logging.getLogger(__name__)

# Headroom the plan must leave: the planner's totals were within -3.5% .. +6.8% of measured peaks (BENCHMARKS.md,
# "Memory planner accuracy"), and a real allocator also loses some memory to fragmentation and to buffers the planner
# does not see (NCCL, the CUDA context of a second library). A run is admitted when total × (1 + margin) is free.
MEMORY_MARGIN = 0.10

GATE_SETTINGS = ("refuse", "warn")

_WARNED: set[str] = set()


@dataclass(frozen=True)
class MemoryCheck:
    """The plan's total against the capacity: what the gate acts on, recorded in plan.json and summary.json."""

    planned_bytes_per_device: float
    capacity_bytes_per_device: float
    capacity_source: str
    measured: bool          # false: launcher.gpu_memory_gb (a dry run plans for devices that need not be here)
    cuda: bool              # planned for CUDA devices (else the CPU run, in float32)
    checkpointing: bool     # the plan's checkpointing (the resolved model.gradient_checkpointing)
    reference: str          # the plan's reference option (the resolved ref)
    margin: float
    verdict: str            # fits | does not fit | unknown (a layout whose activations the planner does not model)
    largest: str            # the largest term

    @property
    def needed_bytes(self) -> float:
        return self.planned_bytes_per_device * (1 + self.margin)

    def describe(self) -> str:
        return (f"{size(self.planned_bytes_per_device)} planned per device (+{self.margin:.0%} margin: "
                f"{size(self.needed_bytes)}) against {size(self.capacity_bytes_per_device)} "
                f"({self.capacity_source}): {self.verdict}")


def size(n: float) -> str:
    """Bytes as GB, or MB below 1 GB (a twin's plan is a few MB)."""
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / 1e6:.1f} MB"


def run_plan(cfg: RunConfig, reference: str, checkpointing: bool, capacity: Capacity) -> MemoryPlan:
    """The memory plan of the run as it will execute against this capacity: on CPU in the dtype it trains in."""
    cfg = resolve_launcher(cfg)  # launcher.num_processes: null = every visible GPU (2 processes on CPU)
    dtype = run_dtype(cfg, capacity.cuda) if capacity.measured else None  # a dry run plans the configured dtype
    inputs = plan_inputs(cfg, reference, dtype=dtype, checkpointing=checkpointing)
    return plan_memory(replace(inputs, gpu_memory_gb=capacity.bytes_per_device / GB))


def admits(plan: MemoryPlan) -> Optional[bool]:
    """True, False, or None when the modelled terms fit with the margin but unmodelled ones might not."""
    within = plan.total * (1 + MEMORY_MARGIN) <= plan.inputs.gpu_memory_gb * GB
    return None if within and plan.unmodelled else within


def memory_check(plan: MemoryPlan, capacity: Capacity) -> MemoryCheck:
    verdict = {True: "fits", False: "does not fit", None: "unknown"}[admits(plan)]
    return MemoryCheck(planned_bytes_per_device=plan.total, capacity_bytes_per_device=capacity.bytes_per_device,
                       capacity_source=capacity.source, measured=capacity.measured, cuda=capacity.cuda,
                       checkpointing=plan.inputs.checkpointing, reference=plan.inputs.reference,
                       margin=MEMORY_MARGIN, verdict=verdict,
                       largest=plan.largest)


def enforce(cfg: RunConfig, check: Optional[MemoryCheck]) -> None:
    """Refuse (ConfigError, exit 2) or warn about a run whose resolved plan (`plan.memory_gate`; None: the stage trains
    nothing) does not fit. Validation calls it, before anything loads or any rank starts."""
    if check is None or check.verdict != "does not fit":
        return
    message = refusal(cfg, check)
    if cfg.launcher.memory_gate == "warn":
        if message not in _WARNED:  # preflight and the runner both validate the same run: one warning
            _WARNED.add(message)
            log.warning("%s (launcher.memory_gate=warn: going on)", message)
        return
    raise ConfigError(message)


def refusal(cfg: RunConfig, check: MemoryCheck) -> str:
    """One message: the total against what is free, the largest terms, and what would make it fit."""
    capacity = Capacity(check.capacity_bytes_per_device, check.capacity_source, check.measured, check.cuda)
    memory = run_plan(cfg, check.reference, check.checkpointing, capacity)
    terms = sorted(memory.terms, key=memory.terms.get, reverse=True)[:3]
    largest = ", ".join(f"{name} {size(memory.terms[name])}" for name in terms)
    where = "per GPU" if check.cuda else "per process"
    tips = [*memory.advice(), *_recipes_that_fit(cfg, memory)]
    return (f"stage={cfg.stage.name} model={cfg.model.name} does not fit the memory free here: it plans "
            f"{size(check.planned_bytes_per_device)} {where} (+{check.margin:.0%} margin: "
            f"{size(check.needed_bytes)}), and {size(check.capacity_bytes_per_device)} {where} is free "
            f"({check.capacity_source}). Largest terms: {largest}. To fit: {'; '.join(tips) or 'more memory'}. "
            f"(`dry_run=true` shows the whole plan; launcher.memory_gate=warn runs anyway.)")


def _recipes_that_fit(cfg: RunConfig, memory: MemoryPlan) -> list[str]:
    """Presets for this model and stage that train adapters, when full fine-tuning's states are what does not fit."""
    big = sorted(memory.terms, key=memory.terms.get, reverse=True)[:2]
    if cfg.peft.method != "none" or not {"optimizer", "gradients"} & set(big):
        return []
    found = [name for name, preset in _experiment_presets().items()
             if preset.get("model") == cfg.model.name and preset.get("stage") == cfg.stage.name
             and preset.get("peft") in ("lora", "qlora")]
    return [f"the preset that does so for model={cfg.model.name} stage={cfg.stage.name}: "
            + ", ".join(f"experiment={name}" for name in found)] if found else []


def _experiment_presets() -> dict[str, dict[str, Any]]:
    """experiment name → the config groups it overrides (model, stage, peft, ...), read from the YAML defaults."""
    dirs = [PACKAGE_DIR / "conf" / "experiment",
            *(Path(entry.removeprefix("file://")) / "experiment" for entry in search_path()
              if not entry.startswith("pkg://"))]
    presets: dict[str, dict[str, Any]] = {}
    for directory in dirs:
        for path in sorted(directory.glob("*.yaml")) if directory.is_dir() else []:
            try:
                defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults") or []
            except (OSError, yaml.YAMLError):
                continue
            groups = {}
            for entry in defaults:
                if isinstance(entry, dict):
                    for key, value in entry.items():
                        groups[str(key).removeprefix("override ").lstrip("/")] = value
            presets[path.stem] = groups
    return presets
