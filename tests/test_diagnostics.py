"""Training-health alarms: each raised by a run crafted to trigger it, all silent on the healthy demo."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from transformers import TrainerCallback

from alignment.config import DiagnosticsConfig
from alignment.diagnostics import NonFiniteTraining, check

from .conftest import SHORT_DPO, train

FIXTURE = __import__("alignment.config", fromlist=["FIXTURES_DIR"]).FIXTURES_DIR / "tiny_ultrafeedback"
# Trend alarms after 4 steps over a 3-step window, so short crafted runs can raise them.
QUICK = ["diagnostics.after_steps=4", "diagnostics.window=3", "stage.max_steps=8"]


def _alarms(outcome_or_summary) -> dict:
    summary = outcome_or_summary if isinstance(outcome_or_summary, dict) else outcome_or_summary.summary
    return {a["name"]: a for a in summary["diagnostics"]["alarms"]}


def _healthy(step: int) -> dict:
    return {"step": step, "loss": 0.69 - 0.01 * step, "grad_norm": 0.5, "rewards/accuracies": 0.5 + 0.02 * step,
            "rewards/margins": 0.02 * step, "rewards/chosen": 0.01 * step, "rewards/rejected": -0.01 * step}


def test_check_is_silent_on_healthy_curves_and_names_each_problem():
    settings = DiagnosticsConfig(after_steps=4, window=3)
    healthy = [_healthy(s) for s in range(1, 21)]
    assert check(healthy, settings) == []
    nan = healthy[:-1] + [{**healthy[-1], "loss": float("nan")}]
    assert [a.name for a in check(nan, settings)] == ["non_finite"]
    assert [a.name for a in check(healthy[:-1] + [{**healthy[-1], "grad_norm": "inf"}], settings)] == ["non_finite"]
    assert "grad_norm_exploding" in {a.name for a in check(healthy[:-1] + [{**healthy[-1], "grad_norm": 5e3}], settings)}
    sinking = [{**r, "rewards/chosen": -0.1 * r["step"], "rewards/rejected": -0.105 * r["step"]} for r in healthy]
    assert "rewards_sinking_together" in {a.name for a in check(sinking, settings)}
    shrinking = [{**r, "rewards/margins": 1.0 - 0.04 * r["step"]} for r in healthy]
    assert "margins_not_growing" in {a.name for a in check(shrinking, settings)}
    assert check(healthy[:3], settings) == [], "trend alarms wait for after_steps"


class PoisonWeights(TrainerCallback):
    """Turns one weight into NaN after the given step: the next step's loss is NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    from alignment.compose import compose_run_config
    from alignment.runner import run_stage
    from alignment.validation import validate

    run_dir = tmp_path / "nan"
    cfg = compose_run_config([*SHORT_DPO, "stage.max_steps=8", "stage.save_steps=2", f"run_dir={run_dir}"])
    validate(cfg)
    with pytest.raises(NonFiniteTraining, match="became NaN/inf at step 3"):
        run_stage(cfg, callbacks=[PoisonWeights(2)])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "non_finite" in _alarms(summary)
    assert summary["last_complete_checkpoint"].endswith("checkpoint-2")
    assert not (run_dir / "checkpoints" / "checkpoint-4").exists(), "no checkpoint of poisoned weights"
    assert not (run_dir / "model").exists()
    assert (run_dir / "plots" / "loss.png").exists(), "plots of what was logged"


@pytest.mark.slow
def test_tiny_beta_leaves_loss_at_ln2_with_vanishing_gradients(tmp_path):
    outcome = train(tmp_path, "ln2", *SHORT_DPO, *QUICK, "beta=1e-9")
    alarms = _alarms(outcome)
    assert {"loss_at_ln2", "grad_norm_vanishing"} <= alarms.keys()
    assert "ln 2" in alarms["loss_at_ln2"]["message"] and "learning_rate" in alarms["loss_at_ln2"]["advice"]


@pytest.mark.slow
def test_inconsistent_pairs_give_flat_accuracy_and_margins(tmp_path):
    """Half the pairs have chosen and rejected swapped: no preference can be learned."""
    rows = [json.loads(line) for line in (FIXTURE / "train_prefs.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    for row in rows:
        if rng.random() < 0.5:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train_prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    outcome = train(tmp_path, "flat", *SHORT_DPO, *QUICK, f"dataset.path={data}", "dataset.eval_split=null",
                    "stage.max_steps=12", "learning_rate=3e-4")
    assert {"accuracy_flat", "margins_not_growing"} <= _alarms(outcome).keys(), _alarms(outcome)


@pytest.mark.slow
def test_dpo_from_an_untrained_base_at_a_high_rate_sinks_both_rewards(tmp_path):
    """No SFT first and lr 3e-3: the policy pushes probability off chosen and rejected answers alike."""
    outcome = train(tmp_path, "sink", *SHORT_DPO, *QUICK, "learning_rate=3e-3", "stage.max_steps=12")
    alarm = _alarms(outcome)["rewards_sinking_together"]
    assert "both log-probs sink" in alarm["message"] and "raise beta" in alarm["advice"]


@pytest.mark.slow
def test_exploding_gradients_are_flagged(tmp_path):
    """A run whose grad_norm passes the configured ceiling (set low to craft it)."""
    outcome = train(tmp_path, "explode", *SHORT_DPO, *QUICK, "diagnostics.grad_norm_high=1e-3")
    assert "grad_norm_exploding" in _alarms(outcome)
    assert outcome.summary["status"] == "finished", "a warning alarm does not stop training"


@pytest.mark.slow
def test_the_healthy_demo_raises_no_alarm(demo_run):
    for link in ("1-sft", "2-dpo"):
        summary = json.loads((demo_run["dir"] / link / "summary.json").read_text())
        assert summary["diagnostics"]["enabled"] and summary["diagnostics"]["checked_steps"] > 0
        assert summary["diagnostics"]["alarms"] == [], (link, summary["diagnostics"]["alarms"])
    plots = sorted(p.name for p in (demo_run["dir"] / "2-dpo" / "plots").iterdir())
    assert plots == ["grad_norm.png", "learning_rate.png", "loss.png", "rewards_accuracies.png",
                     "rewards_chosen_rejected.png", "rewards_margins.png"]
    assert math.isfinite(summary["final_metrics"]["loss"])


def test_progress_bar_shows_key_metrics_instead_of_printing_each_log():
    from types import SimpleNamespace

    from alignment.tracking import MetricsProgress

    class Bar:
        postfix, written = None, []

        def set_postfix(self, values, refresh=True):
            self.postfix = values

        def write(self, text):
            self.written.append(text)

    progress = MetricsProgress()
    progress.training_bar = Bar()
    state = SimpleNamespace(is_world_process_zero=True)
    progress.on_log(None, state, None, logs={"loss": 0.61234, "rewards/margins": 0.25, "epoch": 0.5, "num_tokens": 9.0})
    assert progress.training_bar.postfix == {"loss": "0.6123", "margin": "0.2500"}
    assert progress.training_bar.written == []
