"""Turn a finished run into evidence: preference accuracy before and after, generations, a judge's win rate.

What is compared:
- the candidate: the evaluated model (a run's saved model or adapter, or the configured model);
- the reference: what the candidate's implicit reward is measured against and the baseline its answers are
  judged against. By default the run's own reference as summary.json records it (a DPO run: its reference
  option's model, the SFT parent for full fine-tuning; an SFT run: its starting model); eval.reference
  overrides it;
- the start: the candidate's model before training, scored against the same reference ("before").
Each distinct model is loaded once, used for everything it is needed for, and freed before the next loads;
adapters on the same base share one loaded base.

Outputs, under <run_dir>/eval/: report.json, generations.jsonl (written whole before judging),
judgments.jsonl (the verdicts in prompt order, written when judging ends or fails) and, for the HTTP judge,
verdicts.jsonl (each verdict appended as it arrives, so an interrupted judge keeps what it judged and a rerun
into the same run dir, resume=true, asks only for the rest).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional


from alignment.errors import ConfigError
from alignment.config.schema import RunConfig
from alignment.records.rundir import RunDir, read_summary, update_summary, write_json
from alignment.models.start import adapter_base_path, is_adapter_dir, resolve_start
from alignment.evaluation.generation import generate, prompt_set, write_generations
from alignment.evaluation.judges import JudgeError, judge_pairs, make_judge
from alignment.evaluation.scoring import PairLogps, pair_logps, preference_accuracy
from alignment.data import data_format, prepare
from alignment.evaluation.harness import run_tasks
from alignment.models.modeling import load_model, load_tokenizer, uses_cuda

log = logging.getLogger(__name__)

EVAL_DIR = "eval"


@dataclass(frozen=True)
class ModelSource:
    weights: str                   # full weights (for an adapter: its base)
    adapter: Optional[str] = None  # a LoRA adapter on those weights


@dataclass(frozen=True)
class Subjects:
    candidate: ModelSource
    reference: ModelSource
    start: Optional[ModelSource]   # the candidate before training; None for a model that was not trained here
    tokenizer: str
    beta: float


def model_source(path: str, cfg: RunConfig) -> ModelSource:
    """A run dir (its model/), a saved model dir, an adapter dir (on the base it names) or a hub id."""
    target = Path(path)
    if (target / "summary.json").exists() and (target / "model").is_dir():
        target = target / "model"
    if is_adapter_dir(target):
        return ModelSource(weights=str(adapter_base_path(target, cfg)), adapter=str(target))
    return ModelSource(weights=str(target) if target.exists() else path)


def subjects_of_run(run_path: Path, cfg: RunConfig) -> Subjects:
    """Candidate, start and reference of a finished training run, read from its summary.json and config.yaml."""
    summary = read_summary(run_path) or {}
    if summary.get("status") not in ("finished", "trained") or "lineage" not in summary:
        raise ConfigError(f"{run_path} is not a finished training run (summary.json status "
                          f"{summary.get('status')!r}); evaluate a run that finished training.")
    lineage = summary["lineage"]
    start = ModelSource(weights=lineage["weights"], adapter=lineage.get("adapter"))
    recorded = summary.get("reference") or {}
    if cfg.eval.reference:
        reference = model_source(cfg.eval.reference, cfg)
    elif recorded.get("option") == "separate":
        reference = model_source(recorded["path"], cfg)
    elif recorded.get("option") == "base":
        reference = ModelSource(weights=start.weights)  # every adapter disabled
    else:  # precomputed, adapter_copy, and an SFT run: the starting model
        reference = start
    # The evaluated run's own beta, as its summary records its stage's settings (a stage without one: the default).
    beta = (summary.get("stage_settings") or {}).get("beta") or DEFAULT_REWARD_BETA
    return Subjects(candidate=model_source(str(run_path), cfg), reference=reference, start=start,
                    tokenizer=str(RunDir(run_path).model), beta=float(beta))


# The implicit reward's scale, beta × (log π - log π_ref), for a model no beta came with (an SFT run, a checkpoint):
# DPO's default. The accuracy does not depend on it; the reported margins scale with it.
DEFAULT_REWARD_BETA = 0.1


def subjects_of_config(cfg: RunConfig) -> Subjects:
    """stage=eval: the parent run's model, or the configured model (then the reference is eval.reference or itself)."""
    if cfg.parent_run:
        return subjects_of_run(Path(cfg.parent_run), cfg)
    start = resolve_start(cfg)
    candidate = ModelSource(weights=str(start.weights))
    reference = model_source(cfg.eval.reference, cfg) if cfg.eval.reference else candidate
    return Subjects(candidate=candidate, reference=reference, start=None, tokenizer=str(start.tokenizer),
                    beta=DEFAULT_REWARD_BETA)


def _each_model(sources: list[ModelSource], cfg: RunConfig) -> Iterator[tuple[ModelSource, Any]]:
    """Every source's model, one base in memory at a time; adapters on one base share it."""

    by_weights: dict[str, list[ModelSource]] = {}
    for source in sources:
        by_weights.setdefault(source.weights, []).append(source)
    for weights, group in by_weights.items():
        model = load_model(weights, cfg)
        if uses_cuda(cfg) and not getattr(model, "is_loaded_in_4bit", False):
            model.to("cuda")
        wrapped = None
        for index, source in enumerate(sorted(group, key=lambda s: s.adapter is not None)):
            if source.adapter is None:
                yield source, model
                continue
            name = f"eval{index}"
            if wrapped is None:
                from peft import PeftModel

                wrapped = PeftModel.from_pretrained(model, source.adapter, adapter_name=name)
            else:
                wrapped.load_adapter(source.adapter, adapter_name=name)
            wrapped.set_adapter(name)
            yield source, wrapped
        del model, wrapped
        gc.collect()
        _empty_cuda_cache()


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _eval_rows(cfg: RunConfig, tokenizer) -> list[dict]:
    """The prepared eval split (checked and truncated as for training), [] when the dataset has none."""

    data = prepare(cfg, tokenizer)
    return data.eval.to_list() if data.eval is not None else []


def _preference_pairs(cfg: RunConfig, rows: list[dict]) -> tuple[list[dict], Optional[str]]:
    """The eval split's preference rows to score (TRL format), or none and why."""
    if not cfg.eval.preference:
        return [], "eval.preference=false"
    if not _is_preference_data(cfg):
        return [], f"dataset {cfg.dataset.name} holds chat data, not preference pairs"
    if not rows:
        return [], (f"dataset {cfg.dataset.name} has no eval split: set dataset.eval_split, or dataset.test_size "
                    f"to hold out part of the training split")
    return (rows[:cfg.eval.max_pairs] if cfg.eval.max_pairs else rows), None


def _prompt_rows(cfg: RunConfig, rows: list[dict]) -> list[dict]:
    """Rows with a `prompt` for the generation prompt set: preference rows as they are, chat rows cut before their
    last assistant turn."""
    if _is_preference_data(cfg):
        return rows
    prompts = []
    for row in rows:
        messages = list(row["messages"])
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant") if any(
            m["role"] == "assistant" for m in messages) else len(messages)
        prompts.append({"prompt": messages[:last]})
    return prompts


def _is_preference_data(cfg: RunConfig) -> bool:

    return data_format(cfg.dataset) == "preference"


def _score_and_generate(cfg: RunConfig, tokenizer, sources: list[ModelSource], pairs: list[dict],
                        prompts: list, answering: set[ModelSource]):
    """Each source's pair log-probs and, for the `answering` ones, its answers; one loaded base at a time.

    In a function of its own so that no model outlives it (the judge may load one more).
    """
    logps: dict[ModelSource, PairLogps] = {}
    answers: dict[ModelSource, list[str]] = {}
    timing = {"scoring_seconds": 0.0, "generation_seconds": 0.0}
    for source, model in _each_model(sources, cfg):
        if pairs:
            began = time.perf_counter()
            logps[source] = pair_logps(model, tokenizer, pairs, cfg.stage.max_length, cfg.eval.batch_size)
            timing["scoring_seconds"] += time.perf_counter() - began
        if source in answering:
            began = time.perf_counter()
            answers[source] = generate(model, tokenizer, prompts, cfg.eval.generation, cfg.seed)
            timing["generation_seconds"] += time.perf_counter() - began
    return logps, answers, timing


def evaluate(cfg: RunConfig, run: RunDir, subjects: Subjects) -> dict[str, Any]:
    """Score, generate, judge; write <run>/eval/ and summary.json["evaluation"]. Returns the report."""

    settings = cfg.eval
    out = run.path / EVAL_DIR
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tokenizer = load_tokenizer(subjects.tokenizer, cfg.model)
    # The eval split is prepared once, for the pairs and, without a prompts file, for the prompts.
    scores_pairs = settings.preference and _is_preference_data(cfg)
    rows = _eval_rows(cfg, tokenizer) if scores_pairs or not settings.generation.prompts else []
    pairs, skipped = _preference_pairs(cfg, rows)
    prompts = prompt_set(settings.generation, pairs or _prompt_rows(cfg, rows))
    report: dict[str, Any] = {
        "candidate": asdict(subjects.candidate), "reference": asdict(subjects.reference),
        "start": asdict(subjects.start) if subjects.start else None, "beta": subjects.beta,
        "dataset": cfg.dataset.name, "status": "running"}
    _write_report(out, report)

    roles = {"candidate": subjects.candidate, "reference": subjects.reference}
    if subjects.start is not None and pairs:
        roles["start"] = subjects.start
    needs_answers = {subjects.candidate, subjects.reference} if prompts else set()
    logps, answers, timing = _score_and_generate(cfg, tokenizer, list(dict.fromkeys(roles.values())), pairs,
                                                 prompts, needs_answers)

    if pairs:
        reference = logps[subjects.reference]
        report["preference"] = {
            "pairs": len(pairs),
            "after": preference_accuracy(logps[subjects.candidate], reference, subjects.beta),
            "before": preference_accuracy(logps[subjects.start], reference, subjects.beta) if "start" in roles else None,
            "pairs_per_second": round(len(pairs) * len(logps) / max(timing["scoring_seconds"], 1e-9), 2)}
    else:
        report["preference"] = {"skipped": skipped}
    if prompts:
        samples = settings.generation.samples_per_prompt
        write_generations(out / "generations.jsonl", prompts,
                          {"policy": answers[subjects.candidate], "baseline": answers[subjects.reference]}, samples)
        report["generation"] = {
            "prompts": len(prompts) // samples, "answers_per_model": len(prompts), "file": str(out / "generations.jsonl"),
            "settings": {k: getattr(settings.generation, k) for k in ("max_new_tokens", "do_sample", "temperature",
                                                                       "top_p", "samples_per_prompt", "batch_size")},
            "generations_per_second": round(len(prompts) * len(needs_answers) / max(timing["generation_seconds"], 1e-9), 2)}
    report["timing"] = {k: round(v, 3) for k, v in timing.items()}
    if settings.lm_eval_tasks:

        report["lm_eval"] = run_tasks(subjects.candidate.weights, subjects.candidate.adapter, cfg)
        _write_report(out, report)
    if settings.judge.name != "none" and not prompts:
        report["judge"] = {"name": settings.judge.name, "status": "skipped", "reason": "no prompts to answer"}
    elif settings.judge.name != "none":
        report["judge"] = {"name": settings.judge.name, "baseline": "reference", "status": "running"}
        _write_report(out, report)
        try:
            # Made after the models are freed: a reward-model judge is one more model in memory.
            judge = make_judge(settings.judge)
            report["judge"].update(_judge_all(judge, prompts, answers[subjects.candidate],
                                              answers[subjects.reference], out))
        except JudgeError as err:
            report["judge"].update(status="failed", error=str(err), judged=len(err.verdicts),
                                   file=str(out / "judgments.jsonl"))
            report["status"] = "failed"
            _finish(run, out, report, started)
            raise
    report["status"] = "finished"
    _finish(run, out, report, started)
    return report


def _judge_all(judge, prompts, policy: list[str], baseline: list[str], out: Path) -> dict[str, Any]:
    """Every prompt's verdict (judge_pairs: the HTTP judge's come concurrently, each appended to verdicts.jsonl as
    it arrives and reused from there on a rerun); judgments.jsonl gets them in prompt order, also when the judge
    fails (what was judged). The win rate counts a tie as half."""
    path = out / "judgments.jsonl"
    try:
        judged = judge_pairs(judge, prompts, policy, baseline, out)
    except JudgeError as err:
        _write_judgments(path, err.verdicts)
        raise
    verdicts = dict(enumerate(judged.verdicts))
    counts = _write_judgments(path, verdicts)
    total = sum(counts.values())
    return {"status": "finished", "judged": total, "wins": counts["policy"], "losses": counts["baseline"],
            "ties": counts["tie"], "win_rate": (counts["policy"] + 0.5 * counts["tie"]) / total,
            "file": str(path), "asked": judged.asked, "reused": judged.reused,
            **({"verdicts_file": str(judged.file)} if judged.file else {})}


def _write_judgments(path: Path, verdicts: dict) -> dict[str, int]:
    """judgments.jsonl: one row per judged prompt, in prompt order, through a temporary file."""
    counts = {"policy": 0, "baseline": 0, "tie": 0}
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for index in sorted(verdicts):
            verdict = verdicts[index]
            winner = {"a": "policy", "b": "baseline", "tie": "tie"}[verdict.winner]
            counts[winner] += 1
            f.write(json.dumps({"index": index, "winner": winner, **verdict.detail}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return counts


def _write_report(out: Path, report: dict) -> None:
    write_json(out / "report.json", report)  # through a temporary file, secrets masked


def _finish(run: RunDir, out: Path, report: dict, started: float) -> None:
    report["seconds"] = round(time.perf_counter() - started, 3)
    _write_report(out, report)
    update_summary(run, evaluation=headline(report))


def headline(report: dict) -> dict[str, Any]:
    """The numbers summary.json and the model card carry; report.json has the rest."""
    preference = report.get("preference") or {}
    judge = report.get("judge") or {}
    return {
        "status": report["status"],
        "report": "eval/report.json",
        "preference_accuracy_before": (preference.get("before") or {}).get("accuracy"),
        "preference_accuracy_after": (preference.get("after") or {}).get("accuracy"),
        "logp_accuracy_after": (preference.get("after") or {}).get("logp_accuracy"),
        "pairs": preference.get("pairs"),
        "judge": judge.get("name"),
        "win_rate": judge.get("win_rate"),
        **({"lm_eval": report["lm_eval"]["results"]} if "lm_eval" in report else {}),
        **({"error": judge["error"]} if "error" in judge else {}),
    }


def format_headline(report: dict) -> str:
    """Lines the console prints after an evaluation."""
    lines = []
    preference = report.get("preference") or {}
    if "after" in preference:
        before = preference.get("before")
        shown = f"{before['accuracy']:.3f} before → " if before else ""
        lines.append(f"held-out preference accuracy ({preference['pairs']} pairs, implicit reward vs the reference): "
                     f"{shown}{preference['after']['accuracy']:.3f}")
    elif preference.get("skipped"):
        lines.append(f"preference accuracy skipped: {preference['skipped']}")
    judge = report.get("judge")
    if judge and judge.get("status") == "finished":
        lines.append(f"judge {judge['name']}: win rate {judge['win_rate']:.3f} over the reference "
                     f"({judge['wins']} wins, {judge['losses']} losses, {judge['ties']} ties)")
    for task, metrics in ((report.get("lm_eval") or {}).get("results") or {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
        lines.append(f"lm-eval {task}: {shown}")
    return "\n".join(lines)
