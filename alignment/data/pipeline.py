"""From the dataset config to the train/eval splits a TRL trainer takes, checked, measured and cached.

select (mix.py) → check + convert + fit lengths (schemas.py, lengths.py) → fail or drop per policy →
lint a sample (lint.py) → save to $ALIGNMENT_CACHE/data/<fingerprint> → load back memory-mapped.

The cache key covers what changes the rows: source bytes (or the hub dataset's fingerprint), source
settings, seed, policies, lengths and the tokenizer with its template. Loading the saved splits back from
disk (also on the first run) lets `datasets` cache TRL's own tokenization next to them, so a second run
or a sweep member neither prepares nor tokenizes again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from alignment.records.cache import cache_root, entry_problem, publish_once
from alignment.errors import ConfigError
from alignment.config.schema import DatasetConfig, RunConfig, SourceConfig, as_dict
from alignment.data import lint as linter
from alignment.data.lengths import measure_chat, measure_preference
from alignment.data.loading import content_fingerprint, load_split, locate, source_key
from alignment.data.mix import ROW, Selection, select
from alignment.data.report import build_report, describe_drops
from alignment.data.schemas import PROBLEM_KINDS, SCHEMAS, check_row, convert_row, drop_advice
from alignment.runtime.ranks import is_main_process

log = logging.getLogger(__name__)

PIPELINE_VERSION = 1
PRIVATE_DIR = "prepared_data"
SOURCE = "__source"


@dataclass
class PreparedData:
    train: Any               # datasets.Dataset in TRL's conversational format
    eval: Any | None
    report: dict
    location: Path | None = None  # the dir the splits are read from; TRL adds its derived files there


def data_format(dataset: DatasetConfig) -> str:
    return SCHEMAS[dataset.schema].format


def prompt_budget(cfg: RunConfig) -> int:
    return getattr(cfg.stage, "max_prompt_length", None) or cfg.stage.max_length - 1  # chat stages have none


def _cache_root() -> Path:
    return cache_root() / "data"


def tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else
                  json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    digest.update(str(tokenizer.chat_template).encode())
    digest.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token]).encode())
    return digest.hexdigest()


def fingerprint(cfg: RunConfig, tokenizer) -> str:
    dataset = cfg.dataset
    sources = []
    for source in dataset.sources:
        content = content_fingerprint(source)
        if content is None:  # a hub dataset: `datasets` fingerprints the cached arrow files it loads
            splits = [s for s in (source.train_split, source.eval_split) if s]
            content = [load_split(source, split)._fingerprint for split in splits]
        # Only the SourceConfig fields choose rows; DatasetConfig's extras (mix, lint, num_proc, ...) do not.
        settings = {f.name: getattr(source, f.name) for f in fields(SourceConfig)}
        sources.append({"settings": settings, "content": content})
    spec = {
        "version": PIPELINE_VERSION, "sources": sources, "seed": cfg.seed, "bad_rows": as_dict(dataset.bad_rows),
        "lint_rows": dataset.lint_rows, "max_length": cfg.stage.max_length, "budget": prompt_budget(cfg),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _features(fmt: str):
    from datasets import Features, List, Value

    message = List({"role": Value("string"), "content": Value("string")})
    columns = {"messages": message} if fmt == "chat" else {"prompt": message, "chosen": message, "rejected": message}
    lengths = ("prompt_tokens", "response_tokens") if fmt == "chat" else ("prompt_tokens", "chosen_tokens",
                                                                            "rejected_tokens")
    return Features({**columns, ROW: Value("int64"), SOURCE: Value("string"), "__drop": Value("string"),
                     "__field": Value("string"), "__detail": Value("string"), "__turns_dropped": Value("int32"),
                     "__cut": Value("bool"), **{f"__{n}": Value("int32") for n in lengths}})


def _process(row: dict, schema_name: str, source_name: str, tokenizer, max_length: int, budget: int) -> dict:
    """One raw row → checked, converted and measured; a row that cannot be used says why in __drop."""
    schema = SCHEMAS[schema_name]
    empty: list = []
    out: dict[str, Any] = ({"messages": empty} if schema.format == "chat" else
                           {"prompt": empty, "chosen": empty, "rejected": empty})
    out.update({ROW: row[ROW], SOURCE: source_name, "__drop": "", "__field": "", "__detail": "",
                "__turns_dropped": 0, "__cut": False, "__prompt_tokens": 0})
    out.update({"__response_tokens": 0} if schema.format == "chat" else {"__chosen_tokens": 0,
                                                                           "__rejected_tokens": 0})
    problem = check_row(schema, row)
    if problem is not None:
        out.update({"__drop": problem.kind, "__field": problem.field, "__detail": problem.detail})
        return out
    converted = convert_row(schema, row)
    measured = (measure_chat(tokenizer, converted, max_length) if schema.format == "chat" else
                measure_preference(tokenizer, converted, max_length, budget))
    if "drop" in measured:
        out["__drop"] = measured["drop"]
        return out
    out.update(measured.pop("row"))
    out.update({f"__{k}": v for k, v in measured.items()})
    return out


def _process_selection(selection: Selection, cfg: RunConfig, tokenizer):
    source = selection.source
    data = selection.data
    return data.map(
        _process,
        fn_kwargs={"schema_name": source.schema, "source_name": source.name, "tokenizer": tokenizer,
                   "max_length": cfg.stage.max_length, "budget": prompt_budget(cfg)},
        remove_columns=[c for c in data.column_names if c != ROW],
        features=_features(SCHEMAS[source.schema].format),
        num_proc=cfg.dataset.num_proc if cfg.dataset.num_proc and len(data) >= 2 * cfg.dataset.num_proc else None,
        desc=f"checking {source.name} {selection.split}",
    )


def _enforce_policies(processed: list[tuple[Selection, Any]], dataset: DatasetConfig) -> None:
    """Stop with every failing kind, a few rows each, before anything trains."""
    failing = {kind for kind in PROBLEM_KINDS if getattr(dataset.bad_rows, kind) == "fail"}
    messages = []
    for selection, data in processed:
        rows = [(d, r, f, t) for d, r, f, t in zip(data["__drop"], data[ROW], data["__field"], data["__detail"])
                if d in failing]
        if not rows:
            continue
        where = f"{selection.source.name} {selection.split} ({locate(selection.source).path})"
        counts = Counter(d for d, *_ in rows)
        for kind, count in counts.items():
            shown = [f"row {r}: {f} {t}" for d, r, f, t in rows if d == kind][:3]
            messages.append(f"{where}: {count} row(s) {kind}; " + "; ".join(shown) +
                            f". Fix the data, or set dataset.bad_rows.{kind}=drop to drop and count such rows.")
    if messages:
        raise ConfigError("bad rows found before training:\n  " + "\n  ".join(messages))


def _lint_sample(train, rows: int) -> list[dict]:
    if rows <= 0 or len(train) == 0:
        return []
    step = max(1, len(train) // rows)  # spread over the whole split, so every mixed source is sampled
    return train.select(range(0, len(train), step)[:rows]).to_list()


def _build(cfg: RunConfig, tokenizer, target: Path, key: str) -> None:
    """Prepare the splits into `target` (a staging dir: publish_once renames it into the cache when complete)."""
    from datasets import concatenate_datasets

    started = time.perf_counter()
    dataset = cfg.dataset
    selections = []
    for index, source in enumerate(dataset.sources):
        selections.extend(select(source, cfg.seed, source_key(index)))
    processed = [(s, _process_selection(s, cfg, tokenizer)) for s in selections]
    _enforce_policies(processed, dataset)

    kept = {"train": [], "eval": []}
    for selection, data in processed:
        kept[selection.role].append(data.filter(lambda drop: drop == "", input_columns="__drop"))
    splits = {role: concatenate_datasets(parts) if parts else None for role, parts in kept.items()}
    if splits["train"] is None or len(splits["train"]) == 0:
        drops = Counter(d for _, data in processed for d in data["__drop"] if d)
        raise ConfigError(f"no training rows left in {dataset.name} after checks and truncation: "
                          f"{describe_drops(processed)}. What to do: {drop_advice(drops)}.")
    findings = linter.lint(tokenizer, _lint_sample(splits["train"], dataset.lint_rows), data_format(dataset))
    report = build_report(cfg, processed, splits, linter.as_records(findings), key)
    report["seconds"] = round(time.perf_counter() - started, 3)

    for role, data in splits.items():
        if data is not None and len(data):
            data.remove_columns([c for c in data.column_names if c.startswith("__")]).save_to_disk(str(target / role))
    (target / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))


def apply_lint_policy(report: dict, policy: str) -> None:
    findings = report["lint"]["findings"] if policy != "off" else []
    errors = [f for f in findings if f["severity"] == "error"]
    for finding in findings:
        log.warning("template lint: %s", linter.describe(finding))
    if errors and policy == "fail":
        raise ConfigError("the chat-template linter found problems that would spoil training:\n  " +
                          "\n  ".join(linter.describe(f) for f in errors) +
                          "\nFix the template or data, or set dataset.lint=warn to train anyway.")


def private_dir(cfg: RunConfig) -> Path:
    """dataset.cache=false: the run's own copy, in its run dir (or a temporary dir for a run without one); the
    shared cache is neither read nor touched."""
    if cfg.run_dir:
        return Path(cfg.run_dir) / PRIVATE_DIR
    return Path(tempfile.mkdtemp(prefix="alignment-data-"))


def prepared_dir(cfg: RunConfig, tokenizer) -> Path:
    """Where the stage's prepared splits are: the verified shared cache entry (built once, under its lock, by
    whichever process gets there first), or with dataset.cache=false a fresh private copy."""

    key = fingerprint(cfg, tokenizer)
    if cfg.dataset.cache:
        entry = _cache_root() / key
        if entry_problem(entry) is None:  # verified (hashes are computed once per process)
            log.info("data: prepared splits reused from %s", entry)
            return entry
        return publish_once(entry, lambda staging: _build(cfg, tokenizer, staging, key), "prepared data")
    target = private_dir(cfg)
    if is_main_process():  # the other ranks read what the main rank prepared (main_process_first)
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        _build(cfg, tokenizer, target, key)
        log.info("data: prepared afresh into %s (dataset.cache=false: the shared cache is not used)", target)
    return target


def prepare(cfg: RunConfig, tokenizer) -> PreparedData:
    """Checked, converted, length-fitted splits for the stage, from the cache when nothing changed."""
    from datasets import load_from_disk

    target = prepared_dir(cfg, tokenizer)
    report = json.loads((target / "report.json").read_text())
    apply_lint_policy(report, cfg.dataset.lint)
    train = load_from_disk(str(target / "train"))
    evaluation = load_from_disk(str(target / "eval")) if (target / "eval").exists() else None
    log.info("data: %s", report["summary"])
    return PreparedData(train, evaluation, report, target)
