"""What a run would do, computed from the config alone (no weights, no network): the dry-run report."""

from __future__ import annotations

import yaml

from alignment.config.schema import RunConfig
from alignment.data.pipeline import prompt_budget
from alignment.plan.memory import ASSUMPTIONS, model_parameter_count, plan_inputs, plan_memory
from alignment.plan.resolved import ResolvedPlan, plan_of
from alignment.config.registry import stage_of
from alignment.records.rundir import masked_config
from alignment.config.offline import is_offline
from alignment.models.source import model_source

def _checkpoint_line(cfg: RunConfig) -> str:
    """Where the configured checkpoint's weights come from."""

    source = model_source(cfg.model.name_or_path, cfg.model.gguf_file)
    if source.gguf_file:
        return f"{source.label} (GGUF: dequantized once into $ALIGNMENT_CACHE/gguf/, then loaded from there)"
    if source.local:
        return f"{source.reference} (local checkpoint)"
    return f"{source.reference} (hub id: {'the local HF cache, offline' if is_offline(cfg) else 'hub or local HF cache'})"


def _dataset_lines(cfg: RunConfig) -> list[str]:
    lines = []
    for index, source in enumerate(cfg.dataset.sources):
        share = f"{source.rows} rows" if source.rows else f"{source.fraction:.0%}"
        held = f"{source.test_size:g} of train held out" if source.test_size else f"eval={source.eval_split}"
        label = "dataset" if index == 0 else "  mixed in"
        lines.append(f"{label:<13}{source.name} ({source.schema}) from {source.path}: {share} of "
                     f"{source.train_split}, {held}")
    return lines


def _evaluation_lines(cfg: RunConfig) -> list[str]:
    settings = cfg.eval
    if stage_of(cfg).trains and not settings.after_training:
        return []
    generation = settings.generation
    subject = (f"the model of {cfg.parent_run}" if not stage_of(cfg).trains and cfg.parent_run else
               "the configured model" if not stage_of(cfg).trains else "this stage's model, after training")
    against = settings.reference or "its own reference (the run's reference model, or its starting model)"
    sampling = (f"sampled at temperature {generation.temperature:g}, top_p {generation.top_p:g}"
                if generation.do_sample else "greedy")
    return [f"evaluation   {subject} against {against}: "
            + (f"preference accuracy on the eval split{f' (at most {settings.max_pairs} pairs)' if settings.max_pairs else ''}; "
               if settings.preference else "")
            + f"{generation.num_prompts} prompts' answers ({generation.max_new_tokens} new tokens, {sampling})"
            + (f", judged by {settings.judge.name}" if settings.judge.name != "none" else "")]


def _memory_lines(cfg: RunConfig, reference: str, plan: ResolvedPlan) -> str:
    """The plan for the configured backend, the same run on each multi-GPU backend for comparison, and what the
    memory gate would do with it."""
    checkpointing = plan.gradient_checkpointing
    inputs = plan_inputs(cfg, reference, checkpointing=checkpointing)
    lines = [plan_memory(inputs).format()]
    world = max(cfg.launcher.num_processes or 1, 2)
    others = []
    for backend in ("ddp", "fsdp", "zero3"):
        other = plan_memory(plan_inputs(cfg, reference, backend=backend, world_size=world, checkpointing=checkpointing))
        others.append(f"{backend} {other.total / 1e9:.1f} GB ({other.verdict})")
    lines.append(f"same run on {world} GPUs per device: " + ", ".join(others))
    if plan.memory_gate is not None:
        action = {"fits": "admits it", "unknown": "admits it (activations not modelled)"}.get(
            plan.memory_gate.verdict, "would refuse it" if cfg.launcher.memory_gate == "refuse" else "would warn")
        lines.append(f"memory gate  {action}: {plan.memory_gate.describe()}; the run measures the memory free where "
                     f"it runs")
    return "\n".join(lines)


def _training_line(cfg: RunConfig, plan: ResolvedPlan) -> str:
    """Steps, learning rate, batch split, lengths and the stage's own settings (beta, loss_type, ...)."""
    stage = cfg.stage
    steps = f"max_steps={stage.max_steps}" if stage.max_steps > 0 else f"{stage.num_train_epochs:g} epoch(s)"
    own = stage_of(cfg).own_settings(stage)
    if "max_prompt_length" in own:
        own["max_prompt_length"] = prompt_budget(cfg)
    return (f"training     {steps}, lr={cfg.learning_rate:g}, {plan.batch.describe()}, "
            f"max_length={stage.max_length}, batching={plan.batching}" + "".join(f", {key}={value:g}" if isinstance(value, float) else
                                                      f", {key}={value}" for key, value in own.items()))


def describe(links: list[RunConfig], launch: str | None = None) -> str:
    """Human-readable plan of every stage a command would run, with its memory plan and the launch command."""
    parts = []
    for index, cfg in enumerate(links, start=1):
        previous = links[index - 2] if index > 1 else None
        params = model_parameter_count(cfg.model)
        weight_gib = params * ASSUMPTIONS["dtype_bytes"][cfg.model.dtype] / 2**30
        described, plan = stage_of(cfg), plan_of(cfg, previous)
        adapter_kept, reference = plan.adapter_kept, plan.reference
        if cfg.parent_run:
            start = f"the model of {cfg.parent_run}"
        elif index > 1:
            start = "the previous stage's model"
        elif cfg.model.tiny:
            start = f"tiny twin built offline from model.architecture (seed {cfg.seed})"
        else:
            start = _checkpoint_line(cfg)
        stage = cfg.stage
        processes = plan.processes
        lines = [
            f"== stage {index}/{len(links)}: {stage.name} with {described.trainer} =="
            + (f" ({described.experimental}: TRL's experimental API)" if described.experimental else ""),
            f"model        {cfg.model.name}: {params:,} parameters ({weight_gib:.2f} GiB of {cfg.model.dtype} weights)",
            f"starts from  {start}",
            f"peft         {cfg.peft.method}" + (" (training the parent's adapter further)" if adapter_kept else ""),
            *([f"checkpointing {'on' if plan.gradient_checkpointing else 'off'} ({plan.gradient_checkpointing_reason})"]
              if described.trains else []),
            *([f"reference    {reference.option}"
               + (f" (ref=auto: {reference.reason})" if reference.requested == "auto" else "")] if reference else []),
            *_dataset_lines(cfg),
            *([_training_line(cfg, plan)] if described.trains else []),
            *_evaluation_lines(cfg),
            f"backend      {cfg.backend.name} on {processes} process{'es' if processes > 1 else ''} over "
            f"{plan.machines} machine(s) (device {cfg.backend.device}, mixed precision "
            f"{cfg.backend.mixed_precision}" + (f": {plan.precision}" if cfg.backend.mixed_precision == "auto" else "")
            + ")",
            f"run dir      {cfg.run_dir or 'a fresh directory under outputs/'}",
            _memory_lines(cfg, reference.option if reference else "base", plan) if described.trains else
            f"memory       one model loaded at a time ({weight_gib:.2f} GiB of weights; adapters share their base)",
            "resolved configuration:",
            yaml.safe_dump(masked_config(cfg), sort_keys=False).rstrip(),
        ]
        parts.append("\n".join(lines))
    if launch:
        parts.append(f"== launch ==\n{launch}")
    return "\n\n".join(parts) + "\n\ndry run: nothing was loaded or written."
