"""Sweeps (`--multirun`): one sweep dir per command, members that fail without stopping the others, reruns that
finish only what is unfinished, and a summary table and comparison plot when the sweep ends.

The sweep dir is named after the command's overrides (not the time), so running the same command again
lands in the same dir: finished members are skipped, interrupted or failed ones resume. Members share the
prepared-data and reference log-prob caches (both keyed without beta or learning rate), so only the first
member pays for them; with Hydra's default launcher they also share one process (one import, one start-up).
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from alignment.records.dashboard import dashboard_spec, save_or_publish
from alignment.sweep.naming import current_sweep_name
from alignment.records.plots import plot_sweep
from alignment.records.rundir import RunDir, read_summary, update_summary
from alignment.records.trackers import wandb_mode
from alignment.records.tracking import read_metrics, train_records

log = logging.getLogger("alignment")

SUMMARY_METRICS = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")
# Set by the callback when a sweep ends: the entrypoint's exit code says whether every member succeeded.
LAST_SWEEP: dict[str, Any] = {}


def objective_value(member_dir: Path, metric: str) -> float:
    """The member's value of the sweep objective: held-out (eval_) when evaluated, else the last training step's."""
    summary = member_summary(member_dir) or {}
    if summary.get("status") != "finished":
        return float("nan")
    evaluation, final = summary.get("eval_metrics") or {}, summary.get("final_metrics") or {}
    value = evaluation.get(f"eval_{metric}", final.get(metric))
    return float(value) if isinstance(value, (int, float)) else float("nan")


def member_summary(member_dir: Path) -> dict[str, Any] | None:
    """The member's own summary; for a chain member, its last link's (the DPO stage a beta sweep is about)."""

    summary = read_summary(member_dir)
    if summary and summary.get("kind") == "chain" and summary.get("links"):
        last = read_summary(Path(summary["links"][-1]["run_dir"])) or {}
        return {**last, "status": summary.get("status", last.get("status")), "run_dir": str(member_dir),
                "metrics_dir": summary["links"][-1]["run_dir"], "sweep": summary.get("sweep")}
    return summary


def _members(sweep_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    dirs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    return [(d, member_summary(d) or {"status": "not started"}) for d in dirs]


def swept_keys(members: list[tuple[Path, dict[str, Any]]]) -> list[str]:
    """Keys whose values differ between members: the columns that tell members apart."""
    values: dict[str, set] = {}
    for _, summary in members:
        for override in (summary.get("sweep") or {}).get("overrides", []):
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
    return [k for k, v in values.items() if len(v) > 1]


def summarise(sweep_dir: Path) -> dict[str, Any]:
    """Write sweep_summary.csv, sweep_summary.md and sweep_comparison.png; return the table and the outcome."""

    members = _members(sweep_dir)
    keys = swept_keys(members)
    rows, curves = [], []
    for member_dir, summary in members:
        overrides = dict(o.partition("=")[::2] for o in (summary.get("sweep") or {}).get("overrides", []))
        final = summary.get("final_metrics") or {}
        evaluation = summary.get("eval_metrics") or {}
        row = {"member": member_dir.name, **{k: overrides.get(k, "") for k in keys}, "status": summary.get("status")}
        row.update({name: final.get(name, "") for name in SUMMARY_METRICS})
        row.update({f"eval_{name}": evaluation.get(f"eval_{name}", "") for name in SUMMARY_METRICS
                    if f"eval_{name}" in evaluation})
        row["run_dir"] = summary.get("run_dir", str(member_dir))
        rows.append(row)
        metrics = Path(summary.get("metrics_dir", member_dir)) / "metrics.jsonl"
        label = " ".join(f"{k}={overrides.get(k, '')}" for k in keys) or member_dir.name
        curves.append((label, train_records(read_metrics(metrics))))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    _write_csv(sweep_dir / "sweep_summary.csv", rows, columns)
    (sweep_dir / "sweep_summary.md").write_text(_markdown(rows, columns))
    if any(records for _, records in curves):
        plot_sweep(curves, sweep_dir / "sweep_comparison.png")
    failed = [r["member"] for r in rows if r["status"] != "finished"]
    return {"sweep_dir": str(sweep_dir), "members": len(rows), "failed": failed, "rows": rows}


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    path.write_text(buffer.getvalue())


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


class SweepSummary(Callback):
    """Hydra callback (alignment/conf/config.yaml): summarises the sweep dir when a --multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.exists():
            return
        outcome = summarise(sweep_dir)
        LAST_SWEEP.clear()
        LAST_SWEEP.update(outcome)
        state = "all finished" if not outcome["failed"] else f"members not finished: {', '.join(outcome['failed'])}"
        print(f"\nsweep: {outcome['members']} members, {state}\n{(sweep_dir / 'sweep_summary.md').read_text()}"
              f"summary: {sweep_dir / 'sweep_summary.csv'}, plot: {sweep_dir / 'sweep_comparison.png'}", flush=True)
        if config.tracker.name == "wandb":

            spec = dashboard_spec(config.tracker.project, config.tracker.entity, current_sweep_name(),
                                  swept_keys(_members(sweep_dir)))
            print(save_or_publish(spec, sweep_dir, online=wandb_mode(config) == "online"), flush=True)


def record_member(member_dir: Path, overrides: list[str], number: int) -> None:
    """What the sweep summary needs from a member: its overrides (the swept values) and its number."""

    update_summary(RunDir(member_dir), sweep={"overrides": list(overrides), "member": number})


def member_state(member_dir: Path) -> str:
    """new | finished | unfinished: a rerun of the sweep skips finished members and resumes unfinished ones."""

    summary = read_summary(member_dir)
    if summary is None:
        return "new"
    return "finished" if summary.get("status") == "finished" else "unfinished"


__all__ = ["LAST_SWEEP", "SweepSummary", "member_state", "record_member", "summarise"]
