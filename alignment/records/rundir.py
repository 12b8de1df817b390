"""Run directories: chosen once, never overwritten when finished, resumable when interrupted.

Layout (the user-facing contract):
    <run_dir>/config.yaml    resolved RunConfig, secrets masked
    <run_dir>/metrics.jsonl  one JSON object per logged step
    <run_dir>/summary.json   status, final metrics, model path, parent run
    <run_dir>/data_report.json  rows per source and split, drops by reason, token lengths, template lint
    <run_dir>/model/         save_pretrained output
    <run_dir>/checkpoints/   trainer checkpoints; each complete one holds a COMPLETE marker
    <run_dir>/run.log        the console log of the run
    <run_dir>/plots/         PNG curves of the logged metrics (alignment/records/plots.py)
A chain (SFT → DPO) uses one directory holding summary.json and one run dir per link (`1-sft`, `2-dpo`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alignment.errors import ConfigError
from alignment.config.schema import RunConfig, as_dict, flatten
from alignment.runtime.ranks import is_main_process
from alignment.secrets import redact

OUTPUTS_ROOT = Path("outputs")
CHECKPOINT_COMPLETE = "COMPLETE"
# Keys that may differ between an interrupted run and its resumption.
_RESUME_FREE_KEYS = {"resume", "run_dir", "dry_run", "data_report", "overrides", "preemption"}


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def data_report(self) -> Path:
        return self.path / "data_report.json"

    @property
    def model(self) -> Path:
        return self.path / "model"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def log(self) -> Path:
        return self.path / "run.log"

    def link(self, index: int, stage: str) -> "RunDir":
        return RunDir(self.path / f"{index}-{stage}")


def default_run_name(cfg: RunConfig, chained: bool) -> str:
    if cfg.run_name:
        return cfg.run_name
    what = cfg.experiment if chained else cfg.stage.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{what}-{cfg.model.name}")


def new_run_path(cfg: RunConfig, chained: bool, now: _dt.datetime | None = None) -> Path:
    """A fresh dir under outputs/<date>/<time>_<name>; a suffix avoids collisions within one second."""
    now = now or _dt.datetime.now()
    base = OUTPUTS_ROOT / now.strftime("%Y-%m-%d") / f"{now.strftime('%H-%M-%S')}_{default_run_name(cfg, chained)}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}_{n}")
    return path


def read_summary(path: Path) -> dict[str, Any] | None:
    summary = path / "summary.json"
    if not summary.exists():
        return None
    try:
        return json.loads(summary.read_text())
    except json.JSONDecodeError:
        return {"status": "unreadable"}


def is_finished(path: Path) -> bool:
    """Everything the run was asked to do is done (with eval.after_training: its evaluation too)."""
    summary = read_summary(path)
    return bool(summary) and summary.get("status") == "finished"


def has_model(path: Path) -> bool:
    """The run trained and saved its model (status `trained` while its after-training evaluation is pending)."""
    summary = read_summary(path)
    return bool(summary) and summary.get("status") in ("finished", "trained")


def check_run_dir(path: Path, resume: bool) -> None:
    """Refuse anything that would overwrite work; explain what to do instead."""
    occupied = path.exists() and any(path.iterdir())
    if path.exists() and not path.is_dir():
        raise ConfigError(f"run_dir={path} is a file, not a directory. Choose another run_dir.")
    if is_finished(path):
        raise ConfigError(
            f"run_dir={path} holds a finished run (summary.json status=finished) and is never overwritten. "
            f"Leave run_dir unset for a fresh directory under outputs/, or choose another run_dir."
        )
    if resume:
        if not occupied or read_summary(path) is None:
            raise ConfigError(
                f"resume=true but run_dir={path} holds no run to resume (no summary.json). "
                f"Point run_dir at the interrupted run's directory, or drop resume=true."
            )
        return
    if occupied:
        status = (read_summary(path) or {}).get("status", "unknown")
        raise ConfigError(
            f"run_dir={path} already holds a run (status: {status}). Pass resume=true to continue it "
            f"from its last complete checkpoint, or choose another run_dir."
        )


def masked_config(cfg: RunConfig) -> dict[str, Any]:
    return redact(as_dict(cfg))


def check_resume_matches(run: RunDir, cfg: RunConfig) -> None:
    """A resumed run must be the same run: any changed setting would silently mix two experiments."""
    if not run.config.exists():
        return
    saved = flatten(yaml.safe_load(run.config.read_text()) or {})
    current = flatten(masked_config(cfg))
    changed = sorted(key for key in saved.keys() | current.keys()
                     if key.split(".")[0] not in _RESUME_FREE_KEYS and saved.get(key) != current.get(key))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} → {current.get(k)!r}" for k in changed[:5])
        raise ConfigError(
            f"resume=true but the configuration differs from the run in {run.path} ({details}). "
            f"Resume with the original settings, or start a new run without resume=true."
        )



def write_json(path: Path, obj: Any) -> None:
    """Write through a temporary file and rename, so a crash never leaves half a summary. Rank 0 only."""
    if not is_main_process():
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(redact(obj), indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def write_config(run: RunDir, cfg: RunConfig) -> None:
    """config.yaml, after a first summary.json: a dir that exists is a run that resume=true can continue."""
    if not is_main_process():
        return
    run.path.mkdir(parents=True, exist_ok=True)
    if not run.summary.exists():
        update_summary(run, status="created", run_dir=str(run.path))
    tmp = run.config.with_name(".config.yaml.tmp")
    tmp.write_text(yaml.safe_dump(masked_config(cfg), sort_keys=False))
    os.replace(tmp, run.config)


def update_summary(run: RunDir, **fields: Any) -> dict[str, Any]:
    summary = read_summary(run.path) or {}
    summary.update(fields)
    if not is_main_process():
        return summary  # only rank 0 writes the run dir's files
    write_json(run.summary, summary)
    return summary


def last_complete_checkpoint(run: RunDir) -> Path | None:
    """Newest checkpoint to resume training from: its COMPLETE marker was written after the trainer
    finished saving it, and training had steps left after it.

    A checkpoint taken at the final step is skipped: transformers resumed from it trains one step too
    many. A run that died after that point (while saving or evaluating) replays from the checkpoint
    before, or from the start, and reaches the same weights (resume is deterministic, tested to 1e-6).
    """
    if not run.checkpoints.exists():
        return None
    resumable = []
    for path in run.checkpoints.glob("checkpoint-*"):
        state_file = path / "trainer_state.json"
        if not (path / CHECKPOINT_COMPLETE).exists() or not state_file.exists():
            continue
        state = json.loads(state_file.read_text())
        if state.get("global_step", 0) < state.get("max_steps", 0):
            resumable.append((state["global_step"], path))
    return max(resumable, default=(0, None))[1]


def newest_complete_checkpoint(run: RunDir) -> str | None:
    """The newest checkpoint with its COMPLETE marker, final step included: what a failed run still has."""
    complete = sorted(run.checkpoints.glob(f"checkpoint-*/{CHECKPOINT_COMPLETE}"),
                      key=lambda p: int(p.parent.name.split("-")[-1]))
    return str(complete[-1].parent) if complete else None
