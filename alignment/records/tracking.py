"""What a run leaves behind while it trains: metrics.jsonl, checkpoint markers, run.log, the final table."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from alignment.records.console import StepClock, number
from alignment.runtime.preemption import phase_boundary
from alignment.runtime.ranks import LAUNCH_STARTED, is_main_process
from alignment.records.rundir import CHECKPOINT_COMPLETE, RunDir
from alignment.secrets import RedactingFilter

log = logging.getLogger("alignment")

# The fields of seed 000's guide to DPO logs, in the order people read them.
TABLE_FIELDS = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected", "grad_norm")
# Keys the trainer logs once at the end of training; they belong in summary.json, not in the step series.
_END_OF_TRAINING_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss"}


class MetricsWriter(TrainerCallback):
    """Appends one JSON object per logged step to metrics.jsonl and logs a compact line about ten
    times per run (main process only). It replaces the trainer's printer, which dumps every dict."""

    def __init__(self, run: RunDir):
        self.run = run
        self.train_summary: dict[str, Any] = {}
        self.timing: dict[str, float] = {}
        self.clock = StepClock(samples_per_step=0)

    def on_train_begin(self, args, state, control, **kwargs):
        self.clock = StepClock(args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size)
        self.clock.start(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if not self.timing:
            # Command → first optimizer step: imports, launch, data, model load, engine set-up (benchmarks read it).
            started = float(os.environ.get(LAUNCH_STARTED, time.time()))
            self.timing = {"first_step_unix": time.time(), "command_to_first_step_s": time.time() - started}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if _END_OF_TRAINING_KEYS & logs.keys():
            self.train_summary.update(logs)
            return
        record = {"step": state.global_step, **{k: _plain(v) for k, v in logs.items()}}
        with self.run.metrics.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
        every = max(1, state.max_steps // 10)
        if state.global_step % every == 0 or state.global_step in (1, state.max_steps) or "eval_loss" in logs:
            prefix = "eval_" if "eval_loss" in logs else ""
            shown = [prefix + k for k in TABLE_FIELDS if isinstance(record.get(prefix + k), (int, float))]
            timing = "" if prefix else self.clock.describe(state.global_step, state.max_steps)
            log.info("step %d/%d %s%s", state.global_step, state.max_steps,
                     " ".join(f"{k}={number(record[k])}" for k in shown), f" {timing}" if timing else "")


class MetricsProgress(ProgressCallback):
    """The trainer's progress bar (terminals only: CI logs get none), with the key metrics as its postfix
    instead of a printed dict per logged step."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            shown = {k.split("/")[-1][:6]: number(v) for k, v in logs.items()
                     if k in ("loss", "rewards/margins", "rewards/accuracies", "grad_norm") and isinstance(v, (int, float))}
            if shown:
                self.training_bar.set_postfix(shown, refresh=False)


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete once the trainer has finished writing it.

    transformers writes checkpoints in place, not atomically; a checkpoint without the marker may be
    partial (the process died while saving) and is never resumed from.
    """

    def __init__(self, run: RunDir):
        self.run = run

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = self.run.checkpoints / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                (checkpoint / CHECKPOINT_COMPLETE).write_text(f"step {state.global_step}\n")


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than silently dropping them
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The logged records; a last line cut short by a killed process is left out (it is logged again on resume)."""
    if not path.exists():
        return []
    records = []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise
    return records


def whole_run_train_loss(records: list[dict[str, Any]]) -> float | None:
    """Mean training loss over every step of the run, from the logged records (each logged loss is the mean of
    the steps since the previous record): what the trainer's train_loss is for a run never resumed."""
    total, steps, previous = 0.0, 0, 0
    for record in train_records(records):
        if isinstance(record.get("loss"), (int, float)):
            span = record["step"] - previous
            total, steps = total + record["loss"] * span, steps + span
        previous = record["step"]
    return total / steps if steps else None


class TokenCount(TrainerCallback):
    """TRL's running token count (`num_tokens`) carried in the checkpoint, so a resumed run counts on from it.

    TRL keeps the count in a private attribute that starts at 0 in every process; transformers' own
    `num_input_tokens_seen` (unused unless include_num_input_tokens_seen is set) is saved with every checkpoint
    and restored on resume, so the count rides in it. trl<2 is pinned; tests/test_preemption.py checks the count.
    """

    def __init__(self):
        self.trainer = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is not None and hasattr(self.trainer, "_total_train_tokens"):
            self.trainer._total_train_tokens = int(state.num_input_tokens_seen or 0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer is not None and args.include_num_input_tokens_seen in ("no", False):
            state.num_input_tokens_seen = int(getattr(self.trainer, "_total_train_tokens", 0))


def train_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Training-step records (evaluation records carry eval_* keys instead of loss)."""
    return [r for r in records if "loss" in r]


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop records logged after the checkpoint we continue from; they will be logged again.

    Rank 0 only: a second rank rewriting the file while rank 0 truncates it can read it empty and erase it.
    """
    if not is_main_process():
        return
    kept = [r for r in read_metrics(path) if r["step"] <= last_step]
    # A new file renamed over the old one: a process killed while writing it leaves the old history whole.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    phase_boundary("metrics_rewrite")
    os.replace(tmp, path)


def format_table(records: list[dict[str, Any]]) -> str:
    """First and last logged training step, seed-000 fields side by side."""
    train = train_records(records)
    if not train:
        return "(no training steps logged)"
    first, last = train[0], train[-1]
    fields = [f for f in TABLE_FIELDS if f in first or f in last]
    width = max(len(f) for f in fields)
    lines = [f"{'field':<{width}}  {'step ' + str(first['step']):>12}  {'step ' + str(last['step']):>12}"]
    for name in fields:
        lines.append(f"{name:<{width}}  {_cell(first.get(name)):>12}  {_cell(last.get(name)):>12}")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return number(value) if isinstance(value, (int, float)) else str(value if value is not None else "-")


def attach_run_log(run: RunDir) -> logging.Handler:
    """Copy everything logged during the run into run.log, secrets removed."""
    handler = logging.FileHandler(run.log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    logging.getLogger().addHandler(handler)
    return handler


def detach_run_log(handler: logging.Handler) -> None:
    logging.getLogger().removeHandler(handler)
    handler.close()
