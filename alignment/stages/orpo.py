"""ORPO (Hong et al. 2024, arXiv 2403.07691): SFT and preference alignment in one loss, no reference model.

The loss is the chosen answer's NLL minus beta (the paper's lambda) times log σ(log odds ratio of chosen over
rejected). TRL 1.x keeps ORPOTrainer under `trl.experimental.orpo` (TRL 1.16: ORPOConfig, ORPOTrainer); this
stage relies on their constructor taking processing_class, peft_config and callbacks, on ORPOConfig's `beta` and
`max_length`, and on the trainer tokenizing in __init__ (tests/test_stages.py pins these).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from alignment.config.schema import PreferenceStageConfig, RunConfig
from alignment.preflight.ranges import Range
from alignment.records.rundir import RunDir
from alignment.models.start import StartingPoint
from alignment.config.registry import Stage, register


@dataclass
class ORPOStageConfig(PreferenceStageConfig):
    beta: float = 0.1   # lambda: weight of the odds-ratio term against the NLL (set with the short key `beta`)

    number_ranges: ClassVar[dict[str, Range]] = {
        "beta": Range(0, low_open=True, note=" It is ORPO's lambda, the odds-ratio weight; the paper uses 0.1."),
    }


def build_trainer(cfg: RunConfig, run: RunDir, start: StartingPoint, callbacks=()):
    # The trainer stack (transformers, peft, trl) loads when a run trains, not when a command is composed.
    from alignment.stages import common

    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return common.build_trainer(cfg, run, start, callbacks, ORPOConfig, ORPOTrainer, beta=cfg.stage.beta)


STAGE = register(Stage(
    name="orpo", config=ORPOStageConfig, description="odds-ratio preference optimisation (SFT + preference, no "
    "reference model)", trainer="trl.experimental.orpo.ORPOTrainer", data_format="preference",
    build_trainer=build_trainer, sequences_per_example=2,
    # The experimental trainer concatenates chosen and rejected and holds their full logits, upcast for the NLL.
    logit_bytes_per_vocab_entry=8, preference_metrics=True, experimental="trl.experimental.orpo",
))
