"""KTO (Ethayarajh et al. 2024, arXiv 2402.01306): a prospect-theoretic loss on unpaired labelled completions.

It reads the same preference datasets as DPO. Each prepared pair becomes two rows, in order: (prompt, chosen,
label true) and (prompt, rejected, label false), with TRL's `unpair_preference_dataset`; so desirable and
undesirable rows are equally many, and the paper's weighting rule (lambda_D n_D / lambda_U n_U in [1, 4/3])
holds with desirable_weight = undesirable_weight = 1. TRL's KTOTrainer (stable API in TRL 1.x) estimates the KL
term from mismatched completions inside each micro batch, so a micro batch needs at least 2 rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from alignment.config.schema import PreferenceStageConfig, RunConfig
from alignment.models.modeling import load_model
from alignment.preflight.ranges import Range
from alignment.plan.resolved import plan_of
from alignment.records.rundir import RunDir
from alignment.models.start import StartingPoint
from alignment.config.registry import Stage, register


@dataclass
class KTOStageConfig(PreferenceStageConfig):
    beta: float = 0.1                 # KL anchor strength (set with the short key `beta`)
    loss_type: str = "kto"            # kto | apo_zero_unpaired
    desirable_weight: float = 1.0     # lambda_D: weight of losses on chosen (desirable) rows
    undesirable_weight: float = 1.0   # lambda_U: weight of losses on rejected (undesirable) rows

    number_ranges: ClassVar[dict[str, Range]] = {
        "beta": Range(0, low_open=True, note=" KTO's paper uses 0.1."),
        "desirable_weight": Range(0, low_open=True), "undesirable_weight": Range(0, low_open=True),
    }



def unpaired(rows):
    """Preference pairs → KTO rows: each pair's chosen (label true), then its rejected (label false)."""
    from trl.data_utils import unpair_preference_dataset

    # Cached beside the prepared split (a derived file, written under the entry's lock by the main process first),
    # so every rank reads the same rows: an in-memory copy would be tokenized into per-process temporary files.
    return unpair_preference_dataset(rows)


def build_trainer(cfg: RunConfig, run: RunDir, start: StartingPoint, callbacks=()):
    # The trainer stack (transformers, peft, trl) loads when a run trains, not when a command is composed.
    from alignment.stages import common

    from trl import KTOConfig, KTOTrainer

    stage = cfg.stage
    choice = plan_of(cfg).reference

    def reference_arguments(data) -> dict:
        return {"ref_model": load_model(cfg.ref.path, cfg) if choice.option == "separate" else None}

    trainer = common.build_trainer(
        cfg, run, start, callbacks, KTOConfig, KTOTrainer, reference_arguments, unpaired,
        beta=stage.beta, loss_type=stage.loss_type, desirable_weight=stage.desirable_weight,
        undesirable_weight=stage.undesirable_weight, precompute_ref_log_probs=choice.option == "precomputed")
    trainer.reference = {"option": choice.option, "requested": choice.requested, "reason": choice.reason,
                         "path": cfg.ref.path if choice.option == "separate" else None}
    return trainer


# TRL's KTOTrainer takes a separate reference, precomputed log-probs, or (PEFT) the base with the adapter disabled;
# it has no frozen copy of a kept parent adapter, so adapter_copy is not offered.
REFERENCE_OPTIONS = ("auto", "base", "separate", "precomputed")


STAGE = register(Stage(
    name="kto", loss_types_from=("trainer/kto_config.py", "KTOConfig"), config=KTOStageConfig, description="Kahneman-Tversky optimisation on unpaired labelled answers",
    trainer="trl.KTOTrainer", data_format="preference", build_trainer=build_trainer, reference=True,
    reference_options=REFERENCE_OPTIONS,
    sequences_per_example=2,  # each row's completion and its mismatched KL completion
    logit_bytes_per_vocab_entry=8, preference_metrics=True,
    summarize=lambda trainer: {"reference": dict(trainer.reference)},
))
