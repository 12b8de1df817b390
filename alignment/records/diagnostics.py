"""Training-health alarms read from the logged metrics, with what to do about each (seed 000's log guide).

Checked on every logged step, on every rank (logged values are gathered, so all ranks agree and stop
together). Two conditions stop training at once, before that step could be saved, and the run ends `failed`
with the diagnosis (the checkpoints on disk are the last good ones):
- non_finite: a NaN/inf loss, grad_norm or logit;
- training_collapsed: gradients that flowed have died. Precisely: the last `window` logged grad_norm values are
  all <= collapse_grad_norm (zero to float precision), an earlier logged grad_norm was > grad_norm_low, and the
  mean loss over those `window` steps is still >= collapse_loss_ratio × the first logged loss (nothing learned).
  A too-high learning rate does this: the model saturates (e.g. into a uniform next-token distribution) and no
  gradient reaches the weights again, while the loss stays flat at its start (ln 2 for DPO). Runs whose
  gradients were tiny from the start (e.g. beta near 0) are `grad_norm_vanishing`, a warning; a DPO run that
  saturated by separating every pair has a loss far below its start, and is not a collapse.
The other alarms warn once each and are recorded in summary.json["diagnostics"]. Each alarm's advice is for its
condition (tests/test_diagnostics.py has one test per alarm): e.g. dead gradients call for a lower learning rate,
gradients that are fine but a loss that does not move for a higher one.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from transformers import TrainerCallback

from alignment.config.schema import DiagnosticsConfig

log = logging.getLogger("alignment")
LN2 = math.log(2)


class TrainingFailed(RuntimeError):
    """Training cannot go on usefully: the run stops, ends `failed` with the diagnosis and keeps its last complete
    checkpoint. The message says what happened and what to do."""


class NonFiniteTraining(TrainingFailed):
    """Loss, gradient norm or logits became NaN/inf."""


class TrainingCollapsed(TrainingFailed):
    """Gradients that flowed died, and the loss is flat at its start: the weights no longer learn."""


# Alarms that stop the run (the rest warn).
FATAL = {"non_finite": NonFiniteTraining, "training_collapsed": TrainingCollapsed}
# Alarms read from metrics every stage logs; the others read DPO's reward metrics.
ANY_STAGE = ("non_finite", "training_collapsed", "grad_norm_exploding", "grad_norm_vanishing")


@dataclass(frozen=True)
class Alarm:
    name: str
    step: int
    message: str
    advice: str


def _values(records: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in records if isinstance(r.get(key), (int, float))]


def _non_finite(record: dict[str, Any]) -> list[str]:
    """Keys whose value is NaN/inf (metrics.jsonl writes them as strings 'nan'/'inf')."""
    keys = ("loss", "grad_norm", "logits/chosen", "logits/rejected")
    bad = []
    for key in keys:
        value = record.get(key)
        if isinstance(value, str) and value.lower().lstrip("+-") in ("nan", "inf", "infinity"):
            bad.append(key)
        elif isinstance(value, float) and not math.isfinite(value):
            bad.append(key)
    return bad


def _collapse(records: list[dict[str, Any]], settings: DiagnosticsConfig) -> Alarm | None:
    """training_collapsed, as defined in the module docstring, or None."""
    grads = [(r["step"], r["grad_norm"]) for r in records if isinstance(r.get("grad_norm"), (int, float))]
    recent = grads[-settings.window:]
    if len(grads) <= settings.window or any(g > settings.collapse_grad_norm for _, g in recent):
        return None
    flowed = [(step, g) for step, g in grads[:-settings.window] if g > settings.grad_norm_low]
    losses = _values(records, "loss")
    last = _values([r for r in records if r["step"] >= recent[0][0]], "loss")
    if not flowed or not losses or not last or statistics.fmean(last) < settings.collapse_loss_ratio * losses[0]:
        return None
    step, largest = max(flowed, key=lambda item: item[1])
    return Alarm("training_collapsed", records[-1]["step"],
                 f"training collapsed: grad_norm has been 0 (<= {settings.collapse_grad_norm:g}) for the last "
                 f"{len(recent)} logged steps, after {largest:.3g} at step {step}, and the loss has not fallen "
                 f"({statistics.fmean(last):.4g} over those steps, {losses[0]:.4g} at the start)",
                 "the run is failed: the update steps saturated the model and no gradient reaches the weights any "
                 "more. Lower learning_rate (e.g. 10× lower) or raise warmup, and train again from the starting "
                 "model (resuming would continue from the collapsed weights)")


def _gradients_died(records: list[dict[str, Any]], settings: DiagnosticsConfig) -> bool:
    """Gradients above grad_norm_low earlier, at or below it now (a collapse in the making)."""
    grads = _values(records, "grad_norm")
    return len(grads) > 1 and grads[-1] <= settings.grad_norm_low and max(grads[:-1]) > settings.grad_norm_low


def check(records: list[dict[str, Any]], settings: DiagnosticsConfig) -> list[Alarm]:
    """Every alarm the records raise at their last step (training records only, oldest first)."""
    if not records:
        return []
    step = records[-1]["step"]
    alarms = []
    bad = _non_finite(records[-1])
    if bad:
        alarms.append(Alarm("non_finite", step, f"{', '.join(bad)} became NaN/inf at step {step}",
                            "training stopped; the last complete checkpoint is kept. Lower learning_rate, check "
                            "the data for empty or extreme rows, and keep max_grad_norm clipping on"))
        return alarms
    collapsed = _collapse(records, settings)
    if collapsed is not None:
        return [collapsed]  # the other alarms read the same dead run; this one says what happened
    died = _gradients_died(records, settings)
    grad = _values(records[-settings.window:], "grad_norm")
    if grad and max(grad) > settings.grad_norm_high:
        alarms.append(Alarm("grad_norm_exploding", step, f"grad_norm reached {max(grad):.3g} (above "
                            f"{settings.grad_norm_high:g})", "lower learning_rate or raise warmup; check for "
                            "outlier rows; seed 000's normal range is about 0.01-1"))
    if step < settings.after_steps:
        return alarms
    recent = records[-settings.window:]
    vanishing = bool(grad) and statistics.median(grad) < settings.grad_norm_low
    if vanishing:
        alarms.append(Alarm("grad_norm_vanishing", step, f"median grad_norm {statistics.median(grad):.3g} over the "
                            f"last {len(grad)} steps is near zero", _DIED if died else
                            "the parameters barely move, and have since the start: check that the trainable "
                            "parameters are the intended ones (peft.target_modules); for DPO raise beta, which "
                            "scales its gradient (typical 0.01-0.5)"))
    loss = _values(recent, "loss")
    if loss and abs(statistics.fmean(loss) - LN2) < settings.ln2_tolerance:
        advice = (_DIED if died else
                  "the gradients are near zero too: raise beta (DPO's gradient scales with it), check that chosen "
                  "and rejected differ and that the trainable parameters are the intended ones" if vanishing else
                  "the gradients are there but the steps are too small: raise learning_rate; also check that chosen "
                  "and rejected differ, and that the reference is not the policy itself with zero updates")
        alarms.append(Alarm("loss_at_ln2", step, f"loss is still {statistics.fmean(loss):.4f} ≈ ln 2 after {step} "
                            f"steps: no preference learned", advice))
    accuracy = _values(recent, "rewards/accuracies")
    if accuracy and abs(statistics.fmean(accuracy) - 0.5) < settings.accuracy_band:
        alarms.append(Alarm("accuracy_flat", step, f"rewards/accuracies is {statistics.fmean(accuracy):.2f}, a coin "
                            f"flip, after {step} steps", "improve the pairs' quality or quantity (are chosen and "
                            "rejected consistently ordered?), or give training more steps"))
    margins = _values(records, "rewards/margins")
    if len(margins) >= 2 * settings.window:
        early, late = statistics.fmean(margins[:settings.window]), statistics.fmean(margins[-settings.window:])
        if late <= early:
            alarms.append(Alarm("margins_not_growing", step, f"rewards/margins fell from {early:.3g} to {late:.3g}",
                                "adjust beta (it sets how sharply the margin is rewarded) or the learning rate"))
    chosen, rejected = _values(recent, "rewards/chosen"), _values(recent, "rewards/rejected")
    if chosen and rejected:
        fall_chosen, fall_rejected = -statistics.fmean(chosen), -statistics.fmean(rejected)
        if fall_chosen > 0 and fall_rejected > 0 and fall_chosen >= settings.sinking_ratio * fall_rejected:
            alarms.append(Alarm("rewards_sinking_together", step, f"rewards/chosen ({-fall_chosen:.3g}) is falling "
                                f"nearly as fast as rewards/rejected ({-fall_rejected:.3g}): both log-probs sink",
                                "the policy moves probability off both answers; lower learning_rate, raise beta, or "
                                "start DPO from a better SFT model"))
    return alarms


_DIED = ("the gradients were there at the start and have died: the update steps saturated the model. Lower "
         "learning_rate (e.g. 10× lower) or raise warmup")


class Diagnostics(TrainerCallback):
    """Runs `check` on every logged training step; warns once per alarm, stops on a FATAL one."""

    def __init__(self, settings: DiagnosticsConfig, preference_metrics: bool):
        self.settings = settings
        self.preference = preference_metrics  # the stage logs rewards/* (its registry entry says so)
        self.records: list[dict[str, Any]] = []
        self.alarms: dict[str, Alarm] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.settings.enabled or not logs or "loss" not in logs:
            return
        record = {"step": state.global_step, **{k: (v.item() if hasattr(v, "item") else v) for k, v in logs.items()}}
        self.records.append(record)
        for alarm in check(self.records, self.settings):
            if not self.preference and alarm.name not in ANY_STAGE:
                continue  # the reward and ln 2 alarms read DPO's metrics
            if alarm.name not in self.alarms:
                self.alarms[alarm.name] = alarm
                if state.is_world_process_zero:
                    log.warning("diagnostics: %s. What to do: %s.", alarm.message, alarm.advice)
            if alarm.name in FATAL:
                raise FATAL[alarm.name](f"{alarm.message}; {alarm.advice}")

    def summary(self) -> dict[str, Any]:
        return {"enabled": self.settings.enabled, "checked_steps": len(self.records),
                "alarms": [asdict(a) for a in self.alarms.values()]}
