"""The model card (README.md in the model dir, Hugging Face format): where the model came from, what it was
trained on, with which settings, and how it ended. Written by rank 0 after the model is saved."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from alignment import __version__
from alignment.config.schema import RunConfig
from alignment.records.rundir import RunDir
from alignment.secrets import redact_text
from alignment.config.sources import looks_local
from alignment.config.registry import stage_of

CARD_METRICS = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected",
                "mean_token_accuracy")


def is_hub_id(reference: str | None) -> bool:
    """`owner/name` that is not a local path: what the Hub's base_model and datasets metadata accept."""
    return bool(reference) and not looks_local(reference) and re.fullmatch(r"[\w.-]+/[\w.-]+", reference) is not None


def direct_base(run: RunDir, summary: dict[str, Any]) -> str:
    """The model this one sits on: an adapter's recorded base, or the weights a full model started from."""
    adapter_config = run.model / "adapter_config.json"
    if adapter_config.exists():
        return json.loads(adapter_config.read_text()).get("base_model_name_or_path") or "?"
    return (summary.get("lineage") or {}).get("weights") or "?"


def card_data(cfg: RunConfig, run: RunDir, summary: dict[str, Any]):
    """The card's metadata (huggingface_hub's ModelCardData): license, base model and how this one relates to it,
    datasets that are hub ids, and the evaluation as model-index results."""
    from huggingface_hub import EvalResult, ModelCardData

    adapter = (run.model / "adapter_config.json").exists()
    base = direct_base(run, summary)
    original = (summary.get("lineage") or {}).get("base_model")
    # The Hub links base_model to a repository: the direct base when it is one; otherwise the original base
    # when that is one (the relation is then indirect, so none is claimed).
    base_model = base if is_hub_id(base) else original if is_hub_id(original) else None
    relation = ("adapter" if adapter else "finetune") if base_model == base else None
    results = []
    evaluation = summary.get("evaluation") or {}
    eval_split = cfg.dataset.eval_split or "held-out split"
    for name, value in (("held-out preference accuracy (implicit reward)", evaluation.get("preference_accuracy_after")),
                        (f"win rate over the reference ({evaluation.get('judge')} judge)", evaluation.get("win_rate")),
                        ("eval rewards/accuracies", (summary.get("eval_metrics") or {}).get("eval_rewards/accuracies"))):
        if isinstance(value, (int, float)):
            results.append(EvalResult(task_type="text-generation", dataset_type=cfg.dataset.path,
                                      dataset_name=f"{cfg.dataset.name} {eval_split}", dataset_split=eval_split,
                                      metric_type="accuracy", metric_value=round(float(value), 4), metric_name=name))
    return ModelCardData(
        license=cfg.model.license, base_model=base_model, base_model_relation=relation,
        library_name="peft" if adapter else "transformers",
        tags=["alignment", "trl", cfg.stage.name, *(["lora"] if adapter else [])],
        datasets=[source.path for source in cfg.dataset.sources if is_hub_id(source.path)] or None,
        model_name=run.path.name if results else None, eval_results=results or None)


def _front_matter(cfg: RunConfig, run: RunDir, summary: dict[str, Any]) -> str:
    return "---\n" + card_data(cfg, run, summary).to_yaml() + "\n---\n"


def _metrics_table(title: str, metrics: dict[str, Any], prefix: str = "") -> list[str]:
    rows = [(name, metrics[prefix + name]) for name in CARD_METRICS if isinstance(metrics.get(prefix + name), (int, float))]
    if not rows:
        return []
    return [f"### {title}", "", "| metric | value |", "|---|---|", *(f"| {n} | {v:.4f} |" for n, v in rows), ""]


def model_card(cfg: RunConfig, run: RunDir, summary: dict[str, Any]) -> str:
    lineage = summary.get("lineage") or {}
    batch = summary.get("batch") or {}
    reference = summary.get("reference") or {}
    adapter = (run.model / "adapter_config.json").exists()
    gguf = lineage.get("gguf_source") or {}
    lines = [_front_matter(cfg, run, summary), f"# {run.path.name}", "",
             f"A {cfg.stage.name.upper()} stage ({stage_of(cfg).trainer}) trained with alignment {__version__} on TRL "
             f"{(summary.get('versions') or {}).get('trl', '?')}; saved as {'a LoRA adapter' if adapter else 'a full model'}.",
             "", "## Lineage", "",
             f"- {'sits on' if adapter else 'fine-tuned from'}: `{direct_base(run, summary)}`",
             f"- original base model: `{lineage.get('base_model', '?')}`"
             + (f", dequantized from the GGUF file `{gguf.get('gguf_file')}` (sha256 {gguf.get('sha256')})" if gguf else "")]
    for ancestor in lineage.get("ancestors", []):
        lines.append(f"- parent run: `{ancestor['run_dir']}` ({ancestor.get('stage')}, saved {ancestor.get('saved')})")
    lines += [f"- started from: {lineage.get('start', '?')} `{lineage.get('weights', '?')}`", "", "## Data", ""]
    report_path = run.data_report
    composition = json.loads(report_path.read_text()).get("composition", []) if report_path.exists() else []
    lines += ["| source | path | split | role | rows kept |", "|---|---|---|---|---|"]
    lines += [f"| {c['source']} | `{c['path']}` | {c['split']} | {c['role']} | {c['kept']} |" for c in composition]
    settings = {"learning_rate": cfg.learning_rate, "schedule": f"{cfg.stage.lr_scheduler_type}, warmup {cfg.stage.warmup_ratio}",
                "steps": cfg.stage.max_steps if cfg.stage.max_steps > 0 else f"{cfg.stage.num_train_epochs:g} epoch(s)",
                "global batch": f"{batch.get('global')} = {batch.get('micro')} × {batch.get('accumulation')} × "
                                f"{batch.get('processes')} processes",
                "max_length": cfg.stage.max_length, "peft": cfg.peft.method, "backend": cfg.backend.name,
                "seed": cfg.seed}
    described = stage_of(cfg)
    settings.update({key: value for key, value in described.own_settings(cfg.stage).items() if value is not None})
    if described.reference:
        settings["reference"] = reference.get("option", cfg.ref.name)
    lines += ["", "## Settings", "", "| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in settings.items()),
              "", "## Results", ""]
    lines += _metrics_table("Last training step", summary.get("final_metrics") or {})
    lines += _metrics_table("Held-out evaluation", summary.get("eval_metrics") or {}, prefix="eval_")
    lines += _evaluation_lines(summary.get("evaluation") or {})
    lines += [f"Run dir: `{run.path}` (config.yaml, metrics.jsonl, summary.json, plots/).", ""]
    return "\n".join(lines)


def _evaluation_lines(evaluation: dict[str, Any]) -> list[str]:
    """The evaluation's headline (alignment/evaluation), when the run was evaluated after training."""
    rows = [("preference accuracy before training", evaluation.get("preference_accuracy_before")),
            ("preference accuracy after training", evaluation.get("preference_accuracy_after")),
            (f"win rate over the reference ({evaluation.get('judge')} judge)", evaluation.get("win_rate"))]
    rows = [(name, value) for name, value in rows if isinstance(value, (int, float))]
    if not rows:
        return []
    pairs = evaluation.get("pairs")
    return ["### Evaluation", "", f"Implicit-reward accuracy on {pairs} held-out pairs against the reference; "
            f"details in `{evaluation.get('report')}`.", "", "| metric | value |", "|---|---|",
            *(f"| {name} | {value:.4f} |" for name, value in rows), ""]


def write_model_card(cfg: RunConfig, run: RunDir, summary: dict[str, Any]) -> Path:
    path = run.model / "README.md"
    path.write_text(redact_text(model_card(cfg, run, summary)))  # a run name or path may carry a pasted token
    return path
