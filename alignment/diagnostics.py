"""Training-health alarms read from the logged metrics, with what to do about each (seed 000's log guide).

Checked on every logged step, on every rank (logged values are gathered, so all ranks agree and stop
together). A non-finite loss, grad_norm or logit stops training at once, before that step could be saved:
the checkpoints on disk are the last good ones. The other alarms warn once each and are recorded in
summary.json["diagnostics"].
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

from transformers import TrainerCallback

from .config import DiagnosticsConfig

log = logging.getLogger("alignment")
LN2 = math.log(2)


class NonFiniteTraining(RuntimeError):
    """Loss, gradient norm or logits became NaN/inf: the run stops and keeps its last complete checkpoint."""


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
    grad = _values(records[-settings.window:], "grad_norm")
    if grad and max(grad) > settings.grad_norm_high:
        alarms.append(Alarm("grad_norm_exploding", step, f"grad_norm reached {max(grad):.3g} (above "
                            f"{settings.grad_norm_high:g})", "lower learning_rate or raise warmup; check for "
                            "outlier rows; seed 000's normal range is about 0.01-1"))
    if step < settings.after_steps:
        return alarms
    recent = records[-settings.window:]
    if grad and statistics.median(grad) < settings.grad_norm_low:
        alarms.append(Alarm("grad_norm_vanishing", step, f"median grad_norm {statistics.median(grad):.3g} over the "
                            f"last {len(grad)} steps is near zero", "the parameters barely move: check that the "
                            "trainable parameters are the intended ones (peft target modules), beta and learning_rate"))
    loss = _values(recent, "loss")
    if loss and abs(statistics.fmean(loss) - LN2) < settings.ln2_tolerance:
        alarms.append(Alarm("loss_at_ln2", step, f"loss is still {statistics.fmean(loss):.4f} ≈ ln 2 after {step} "
                            f"steps: no preference learned", "raise learning_rate, check that chosen and rejected "
                            "differ, and that the reference is not the policy itself with zero updates"))
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


class Diagnostics(TrainerCallback):
    """Runs `check` on every logged training step; warns once per alarm, stops on non-finite values."""

    def __init__(self, settings: DiagnosticsConfig, stage: str):
        self.settings = settings
        self.preference = stage == "dpo"
        self.records: list[dict[str, Any]] = []
        self.alarms: dict[str, Alarm] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.settings.enabled or not logs or "loss" not in logs:
            return
        record = {"step": state.global_step, **{k: (v.item() if hasattr(v, "item") else v) for k, v in logs.items()}}
        self.records.append(record)
        for alarm in check(self.records, self.settings):
            if not self.preference and alarm.name not in ("non_finite", "grad_norm_exploding", "grad_norm_vanishing"):
                continue  # the reward and ln 2 alarms read DPO's metrics
            if alarm.name not in self.alarms:
                self.alarms[alarm.name] = alarm
                if state.is_world_process_zero:
                    log.warning("diagnostics: %s. What to do: %s.", alarm.message, alarm.advice)
            if alarm.name == "non_finite":
                raise NonFiniteTraining(f"{alarm.message}; {alarm.advice}")

    def summary(self) -> dict[str, Any]:
        return {"enabled": self.settings.enabled, "checked_steps": len(self.records),
                "alarms": [asdict(a) for a in self.alarms.values()]}
