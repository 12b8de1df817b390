"""An interrupted run resumed from its last complete checkpoint ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json

import pytest
from transformers import TrainerCallback

from alignment.preflight.compose import compose_run_config
from alignment.errors import ConfigError
from alignment.runner import run_stage
from alignment.preflight.validation import validate

from alignment.records.tracking import read_metrics

pytestmark = pytest.mark.slow

SETTINGS = ["stage=dpo", "stage.max_steps=8", "stage.save_steps=3", "stage.max_length=128", "stage.max_prompt_length=64",
            "stage.per_device_train_batch_size=8", "stage.global_batch_size=8", "learning_rate=1e-3", "stage.eval_steps=null"]


class CrashAtStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


def _config(run_dir, *extra):
    cfg = compose_run_config([*SETTINGS, f"run_dir={run_dir}", *extra])
    validate(cfg)
    return cfg


def test_resume_matches_an_uninterrupted_run(tmp_path):
    reference = run_stage(_config(tmp_path / "straight"))
    expected = [r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "loss" in r]

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage(_config(tmp_path / "crashed"), callbacks=[CrashAtStep(7)])
    crashed = tmp_path / "crashed"
    assert json.loads((crashed / "summary.json").read_text())["status"] == "failed"
    # A checkpoint the process died while writing has no COMPLETE marker and must be ignored.
    (crashed / "checkpoints" / "checkpoint-7").mkdir()

    with pytest.raises(ConfigError, match="already holds a run"):
        validate(_config(crashed))
    resumed = run_stage(_config(crashed, "resume=true"))
    assert resumed.summary["resumed_from"].endswith("checkpoint-6")
    assert resumed.summary["status"] == "finished"

    losses = [r["loss"] for r in read_metrics(crashed / "metrics.jsonl") if "loss" in r]
    steps = [r["step"] for r in read_metrics(crashed / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 9)), "each step logged exactly once across crash and resume"
    assert losses[-1] == pytest.approx(expected[-1], abs=1e-6)
    assert reference.summary["final_metrics"]["loss"] == pytest.approx(resumed.summary["final_metrics"]["loss"],
                                                                        abs=1e-6)


def test_a_run_that_died_after_its_last_step_resumes_to_the_same_weights(tmp_path):
    """The final checkpoint exists but the process died before the run was marked finished."""
    straight = run_stage(_config(tmp_path / "straight"))
    assert (tmp_path / "straight" / "checkpoints" / "checkpoint-8" / "COMPLETE").exists()
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    (tmp_path / "straight" / "summary.json").write_text(json.dumps({**summary, "status": "failed"}))
    resumed = run_stage(_config(tmp_path / "straight", "resume=true"))
    assert resumed.summary["resumed_from"].endswith("checkpoint-6")
    steps = [r["step"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 9))
    assert resumed.summary["final_metrics"]["loss"] == pytest.approx(straight.summary["final_metrics"]["loss"],
                                                                      abs=1e-6)


def test_resume_refuses_changed_settings(tmp_path):
    with pytest.raises(RuntimeError):
        run_stage(_config(tmp_path / "run"), callbacks=[CrashAtStep(4)])
    with pytest.raises(ConfigError, match="configuration differs.*beta"):
        run_stage(_config(tmp_path / "run", "resume=true", "beta=0.3"))
