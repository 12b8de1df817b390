"""Training-health alarms: each raised by a run crafted to trigger it, all silent on the healthy demo."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from transformers import TrainerCallback

from alignment.config.schema import DiagnosticsConfig
from alignment.records.diagnostics import Diagnostics, NonFiniteTraining, TrainingCollapsed, check

from .conftest import SHORT_DPO, train

FIXTURE = __import__("alignment.config.schema", fromlist=["FIXTURES_DIR"]).FIXTURES_DIR / "tiny_ultrafeedback"
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
    from alignment.preflight.compose import compose_run_config
    from alignment.runner import run_stage
    from alignment.preflight.validation import validate

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
    # DPO's gradient scales with beta: the right advice is a larger beta, not a larger learning rate.
    assert "ln 2" in alarms["loss_at_ln2"]["message"] and "raise beta" in alarms["loss_at_ln2"]["advice"]
    assert "learning_rate" not in alarms["loss_at_ln2"]["advice"]
    assert "raise beta" in alarms["grad_norm_vanishing"]["advice"]
    assert "training_collapsed" not in alarms and outcome.summary["status"] == "finished", \
        "gradients tiny from the start are not a collapse"


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

    from alignment.records.tracking import MetricsProgress

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


# One test per alarm: a condition crafted to raise it, and the advice that condition calls for.
ALARM_SETTINGS = DiagnosticsConfig(after_steps=4, window=3)


def _records(steps: int, **series) -> list[dict]:
    """Healthy records with some metrics replaced: series maps a metric to a function of the step."""
    return [{**_healthy(s), **{k: f(s) for k, f in series.items()}} for s in range(1, steps + 1)]


def _raised(records: list[dict]) -> dict:
    return {a.name: a for a in check(records, ALARM_SETTINGS)}


def test_alarm_non_finite_advises_a_lower_learning_rate():
    alarm = _raised(_records(6, loss=lambda s: float("nan") if s == 6 else 0.6))["non_finite"]
    assert "Lower learning_rate" in alarm.advice and "max_grad_norm" in alarm.advice


def test_alarm_grad_norm_exploding_advises_a_lower_learning_rate():
    alarm = _raised(_records(6, grad_norm=lambda s: 5e3 if s == 6 else 0.5))["grad_norm_exploding"]
    assert alarm.advice.startswith("lower learning_rate")


def test_alarm_vanishing_gradients_from_the_start_advise_beta_and_trainable_parameters():
    alarms = _raised(_records(8, grad_norm=lambda s: 7e-10, loss=lambda s: 0.6931))
    assert "raise beta" in alarms["grad_norm_vanishing"].advice
    assert "peft.target_modules" in alarms["grad_norm_vanishing"].advice
    assert "raise beta" in alarms["loss_at_ln2"].advice and "learning_rate" not in alarms["loss_at_ln2"].advice
    assert "training_collapsed" not in alarms


def test_alarm_gradients_that_died_advise_a_lower_learning_rate():
    """Before the collapse is certain (fewer than `window` dead steps), the warnings already say: lower the rate."""
    records = _records(6, grad_norm=lambda s: 0.7 if s <= 4 else 0.0, loss=lambda s: 0.69)
    alarms = _raised(records)
    assert "training_collapsed" not in alarms
    for name in ("grad_norm_vanishing", "loss_at_ln2"):
        assert "Lower learning_rate" in alarms[name].advice and "raise" not in alarms[name].advice.split(".")[1]


def test_alarm_loss_at_ln2_with_healthy_gradients_advises_a_higher_learning_rate():
    alarm = _raised(_records(8, loss=lambda s: 0.6931, grad_norm=lambda s: 0.5))["loss_at_ln2"]
    assert "raise learning_rate" in alarm.advice and "steps are too small" in alarm.advice


def test_alarm_accuracy_flat_advises_better_pairs():
    alarm = _raised(_records(8, **{"rewards/accuracies": lambda s: 0.5}))["accuracy_flat"]
    assert "consistently ordered" in alarm.advice


def test_alarm_margins_not_growing_advises_beta_or_the_learning_rate():
    alarm = _raised(_records(8, **{"rewards/margins": lambda s: 1.0 - 0.1 * s}))["margins_not_growing"]
    assert "beta" in alarm.advice and "learning rate" in alarm.advice


def test_alarm_rewards_sinking_together_advises_a_lower_learning_rate_or_higher_beta():
    alarm = _raised(_records(8, **{"rewards/chosen": lambda s: -0.1 * s, "rewards/rejected": lambda s: -0.105 * s})
                    )["rewards_sinking_together"]
    assert "lower learning_rate" in alarm.advice and "raise beta" in alarm.advice


def test_alarm_training_collapsed_is_the_only_alarm_and_advises_a_lower_learning_rate():
    """The run of the issue: lr 1e4 on the tiny twin, grad_norm 0.66 and 0.81, then exactly 0, loss flat at ln 2."""
    records = _records(6, grad_norm=lambda s: {1: 0.66, 2: 0.81}.get(s, 0.0), loss=lambda s: 0.6931 - 0.004 * (s % 2))
    alarms = check(records, ALARM_SETTINGS)
    assert [a.name for a in alarms] == ["training_collapsed"]
    alarm = alarms[0]
    assert "grad_norm has been 0" in alarm.message and "after 0.81 at step 2" in alarm.message
    assert "Lower learning_rate" in alarm.advice and "raise learning_rate" not in alarm.advice


def test_collapse_is_precisely_defined():
    """Not a collapse: gradients tiny from the start, too few dead steps, a loss far below its start (a DPO run that
    saturated by separating every pair), a healthy run. A collapse: `window` dead steps after live ones, loss flat."""
    def collapsed(records):
        return "training_collapsed" in _raised(records)

    live_then_dead = {"grad_norm": lambda s: 0.7 if s <= 3 else 0.0}
    assert collapsed(_records(6, loss=lambda s: 0.69, **live_then_dead))
    assert not collapsed(_records(5, loss=lambda s: 0.69, **live_then_dead)), "only 2 dead steps of the window's 3"
    assert not collapsed(_records(6, loss=lambda s: 0.69 if s <= 3 else 1e-4, **live_then_dead)), "loss fell: learned"
    assert not collapsed(_records(6, loss=lambda s: 0.69, grad_norm=lambda s: 0.0)), "never flowed: vanishing"
    assert not collapsed(_records(6, loss=lambda s: 0.69, grad_norm=lambda s: 1e-9)), "tiny from the start"
    assert not collapsed(_records(6, loss=lambda s: 0.69, grad_norm=lambda s: 0.7 if s <= 3 else 1e-6))
    assert not collapsed([_healthy(s) for s in range(1, 41)])
    sft = [{"step": s, "loss": 2.0 if s <= 2 else 7.0, "grad_norm": 3.0 if s <= 2 else 0.0} for s in range(1, 7)]
    assert collapsed(sft), "an SFT model saturated into a uniform next-token distribution (loss up to ln V)"


class _State:
    def __init__(self, step: int):
        self.global_step, self.is_world_process_zero = step, True


def test_a_collapse_stops_training_with_the_diagnosis():
    """The callback raises TrainingCollapsed at the step it is certain (before that step's checkpoint); the runner
    then marks the run `failed` with the message (alignment/runner.py's except path) and summary.json keeps the alarm."""
    diagnostics = Diagnostics(ALARM_SETTINGS, preference_metrics=False)
    grads = {1: 0.66, 2: 0.81}
    with pytest.raises(TrainingCollapsed, match="training collapsed.*Lower learning_rate"):
        for step in range(1, 10):
            diagnostics.on_log(None, _State(step), None, logs={"loss": 0.69, "grad_norm": grads.get(step, 0.0)})
    assert step == 5
    summary = diagnostics.summary()
    assert [a["name"] for a in summary["alarms"]][-1] == "training_collapsed"
    assert not any("raise learning_rate" in a["advice"] for a in summary["alarms"])


def test_identical_pairs_are_a_data_problem_not_a_length_problem():
    from alignment.data.schemas import DROP_ADVICE, drop_advice

    advice = drop_advice({"identical": 512})
    assert "carry no preference" in advice and "fix the pairs" in advice and "raise stage.max_length" not in advice
    assert drop_advice({"response_beyond_max_length": 3}).startswith("response_beyond_max_length: raise stage.max_length")
    assert drop_advice({"prompt_over_budget": 2, "identical": 5}).index("identical") == 0, "most frequent first"
    from alignment.data.schemas import PROBLEM_KINDS

    assert set(PROBLEM_KINDS) | {"prompt_over_budget", "response_beyond_max_length"} == set(DROP_ADVICE)


def test_a_dataset_of_identical_pairs_is_refused_as_a_data_problem(tmp_path, tiny_tokenizer):
    from alignment.preflight.compose import compose_run_config
    from alignment.errors import ConfigError
    from alignment.data import prepare

    rows = [json.loads(line) for line in (FIXTURE / "train_prefs.jsonl").read_text().splitlines()][:16]
    data = tmp_path / "same.jsonl"
    data.write_text("".join(json.dumps({**r, "rejected": r["chosen"]}) + "\n" for r in rows))
    cfg = compose_run_config(["stage=dpo", "dataset=ultrafeedback_binarized", f"dataset.path={data}",
                              "dataset.eval_split=null", "dataset.cache=false", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError) as refused:
        prepare(cfg, tiny_tokenizer)
    assert "16 identical" in str(refused.value) and "carry no preference" in str(refused.value)
    assert "Raise stage.max_length" not in str(refused.value)


def test_a_learning_rate_that_collapses_the_model_fails_the_run_with_the_diagnosis(tmp_path):
    """The run of the issue: DPO at learning_rate=1e4 on the tiny twin. Gradients die after step 2 and the loss stays
    at ln 2; it used to end `finished` with "raise learning_rate". (Fast: it stops at step 5.)"""
    from alignment.preflight.compose import compose_run_config
    from alignment.runner import run_stage
    from alignment.preflight.validation import validate

    run_dir = tmp_path / "collapse"
    cfg = compose_run_config([*SHORT_DPO, *QUICK, "learning_rate=1e4", "stage.max_steps=12", "stage.save_steps=2",
                              f"run_dir={run_dir}"])
    validate(cfg)
    with pytest.raises(TrainingCollapsed, match="training collapsed"):
        run_stage(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "training collapsed" in summary["error"]
    assert "Lower learning_rate" in summary["error"]
    alarms = _alarms(summary)
    assert "training_collapsed" in alarms
    assert not any("raise learning_rate" in a["advice"] for a in alarms.values()), alarms
    assert not (run_dir / "model").exists()
