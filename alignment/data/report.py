"""The data report: composition per source and split, drops by reason, token lengths, linter findings.

Written as data_report.json into every run dir and printed by `python -m alignment data_report=true ...`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from alignment.config.schema import RunConfig
from alignment.data.schemas import SCHEMAS
from alignment.data.lint import describe

PERCENTILES = (50, 90, 99)


def _lengths(values: list[int]) -> dict[str, float]:
    import numpy as np

    if not values:
        return {}
    array = np.asarray(values)
    stats = {f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES}
    return {**stats, "max": int(array.max()), "mean": round(float(array.mean()), 1)}


def _length_columns(data) -> list[str]:
    return [c for c in data.column_names if c.startswith("__") and c.endswith("_tokens")]


def describe_drops(processed) -> str:
    drops = Counter(d for _, data in processed for d in data["__drop"] if d)
    return ", ".join(f"{n} {kind}" for kind, n in drops.most_common()) or "none dropped"


def build_report(cfg: RunConfig, processed, splits: dict[str, Any], findings: list[dict], fingerprint: str) -> dict:
    composition = []
    for selection, data in processed:
        drops = Counter(d for d in data["__drop"] if d)
        composition.append({
            "source": selection.source.name,
            "path": selection.source.path,
            "schema": selection.source.schema,
            "role": selection.role,
            "split": selection.split,
            "available": selection.available,
            "selected": len(data),
            "kept": len(data) - sum(drops.values()),
            "dropped": dict(drops),
            "prompts_shortened": sum(1 for t in data["__turns_dropped"] if t > 0),
            "cut_at_max_length": sum(1 for c, d in zip(data["__cut"], data["__drop"]) if c and not d),
        })
    lengths = {}
    for role, data in splits.items():
        if data is None or len(data) == 0:
            continue
        lengths[role] = {c.strip("_").removesuffix("_tokens"): _lengths(list(data[c])) for c in _length_columns(data)}
    totals = {}
    for role in ("train", "eval"):
        entries = [c for c in composition if c["role"] == role]
        if entries:
            dropped: Counter = Counter()
            for entry in entries:
                dropped.update(entry["dropped"])
            totals[role] = {"selected": sum(e["selected"] for e in entries), "kept": sum(e["kept"] for e in entries),
                            "dropped": dict(dropped),
                            "prompts_shortened": sum(e["prompts_shortened"] for e in entries),
                            "cut_at_max_length": sum(e["cut_at_max_length"] for e in entries)}
    return {
        "fingerprint": fingerprint,
        "dataset": cfg.dataset.name,
        "format": SCHEMAS[cfg.dataset.schema].format,
        "max_length": cfg.stage.max_length,
        "max_prompt_length": getattr(cfg.stage, "max_prompt_length", None),
        "seed": cfg.seed,
        "composition": composition,
        "totals": totals,
        "lengths": lengths,
        "lint": {"rows_checked": min(cfg.dataset.lint_rows, totals.get("train", {}).get("kept", 0)),
                 "findings": findings},
        "summary": _summary(totals),
    }


def _summary(totals: dict) -> str:
    parts = []
    for role, t in totals.items():
        dropped = sum(t["dropped"].values())
        detail = ", ".join(f"{n} {k}" for k, n in t["dropped"].items())
        parts.append(f"{role} {t['kept']} rows ({dropped} dropped{': ' + detail if detail else ''}; "
                     f"{t['prompts_shortened']} prompts shortened, {t['cut_at_max_length']} cut at max_length)")
    return "; ".join(parts)


def format_report(report: dict) -> str:
    """The report as a console table."""
    lines = [f"data report: {report['dataset']} ({report['format']}), max_length {report['max_length']}, "
             f"max_prompt_length {report['max_prompt_length']}, seed {report['seed']}", ""]
    header = f"{'source':<28}{'split':<26}{'role':<6}{'available':>10}{'selected':>10}{'kept':>8}  dropped"
    lines += [header, "-" * len(header)]
    for c in report["composition"]:
        dropped = ", ".join(f"{k} {n}" for k, n in c["dropped"].items()) or "-"
        lines.append(f"{c['source'][:27]:<28}{c['split'][:25]:<26}{c['role']:<6}{c['available']:>10}"
                     f"{c['selected']:>10}{c['kept']:>8}  {dropped}")
    lines.append("")
    for role, columns in report["lengths"].items():
        for name, stats in columns.items():
            shown = "  ".join(f"{k} {v:g}" for k, v in stats.items())
            lines.append(f"{role:<6}{name + ' tokens':<18}{shown}")
    lines += ["", f"totals: {report['summary']}", ""]
    findings = report["lint"]["findings"]
    lines.append(f"template lint on {report['lint']['rows_checked']} train rows: "
                 f"{'clean' if not findings else str(len(findings)) + ' finding(s)'}")

    lines += [f"  {describe(f)}" for f in findings]
    return "\n".join(lines)
