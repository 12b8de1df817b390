"""What a run would do, computed from the config alone (no weights, no network): the dry-run report."""

from __future__ import annotations

import yaml

from .config import ArchitectureConfig, RunConfig
from .data.pipeline import prompt_budget
from .rundir import masked_config
from .validation import is_offline

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
TRAINERS = {"sft": "trl.SFTTrainer", "dpo": "trl.DPOTrainer"}


def parameter_count(arch: ArchitectureConfig) -> int:
    """Exact parameter count of a Llama-family decoder (Qwen2 adds q/k/v biases), from its config facts."""
    hidden, layers, inter, vocab = arch.hidden_size, arch.num_hidden_layers, arch.intermediate_size, arch.vocab_size
    head_dim = hidden // arch.num_attention_heads
    kv = arch.num_key_value_heads * head_dim
    attention = hidden * hidden * 2 + hidden * kv * 2  # q, o and k, v projections
    if arch.model_type == "qwen2":
        attention += hidden + 2 * kv  # Qwen2 projects q, k, v with bias
    per_layer = attention + 3 * hidden * inter + 2 * hidden  # gated MLP and two RMSNorms
    embeddings = vocab * hidden * (1 if arch.tie_word_embeddings else 2)
    return embeddings + layers * per_layer + hidden  # final norm


def _dataset_lines(cfg: RunConfig) -> list[str]:
    lines = []
    for index, source in enumerate(cfg.dataset.sources):
        share = f"{source.rows} rows" if source.rows else f"{source.fraction:.0%}"
        held = f"{source.test_size:g} of train held out" if source.test_size else f"eval={source.eval_split}"
        label = "dataset" if index == 0 else "  mixed in"
        lines.append(f"{label:<13}{source.name} ({source.schema}) from {source.path}: {share} of "
                     f"{source.train_split}, {held}")
    return lines


def describe(links: list[RunConfig]) -> str:
    """Human-readable plan of every stage a command would run."""
    parts = []
    for index, cfg in enumerate(links, start=1):
        params = parameter_count(cfg.model.architecture)
        weight_gib = params * _BYTES.get(cfg.model.dtype, 2) / 2**30
        if cfg.parent_run:
            start = f"the model of {cfg.parent_run}"
        elif index > 1:
            start = "the previous stage's model"
        elif cfg.model.tiny:
            start = f"tiny twin built offline from model.architecture (seed {cfg.seed})"
        else:
            start = f"{cfg.model.name_or_path} ({'offline: local copy required' if is_offline(cfg) else 'hub or local'})"
        stage = cfg.stage
        steps = f"max_steps={stage.max_steps}" if stage.max_steps > 0 else f"{stage.num_train_epochs:g} epoch(s)"
        lines = [
            f"== stage {index}/{len(links)}: {stage.name} with {TRAINERS[stage.name]} ==",
            f"model        {cfg.model.name}: {params:,} parameters ({weight_gib:.2f} GiB of {cfg.model.dtype} weights)",
            f"starts from  {start}",
            f"peft         {cfg.peft.method}",
            *_dataset_lines(cfg),
            f"training     {steps}, lr={cfg.learning_rate:g}, micro batch {stage.per_device_train_batch_size} × "
            f"accumulation {stage.gradient_accumulation_steps}, max_length={stage.max_length}"
            + (f", max_prompt_length={prompt_budget(cfg)}" if stage.name == "dpo" else "")
            + (f", beta={cfg.beta:g}" if stage.name == "dpo" else ""),
            f"backend      {cfg.backend.name} (device {cfg.backend.device}, mixed precision {cfg.backend.mixed_precision})",
            f"run dir      {cfg.run_dir or 'a fresh directory under outputs/'}",
            "resolved configuration:",
            yaml.safe_dump(masked_config(cfg), sort_keys=False).rstrip(),
        ]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n\ndry run: nothing was loaded or written."
