"""CPO (Xu et al. 2024, arXiv 2401.08417) and, with loss_type=simpo and cpo_alpha=0, SimPO (Meng et al. 2024,
arXiv 2405.14734): reference-free preference losses on length-normalised (SimPO) or summed log-probs.

TRL 1.x keeps CPOTrainer under `trl.experimental.cpo` (TRL 1.16: CPOConfig, CPOTrainer); this stage relies on
CPOConfig's beta, loss_type (sigmoid | hinge | ipo | simpo), cpo_alpha (weight of the NLL term), simpo_gamma (the
target margin, absolute: SimPO's configs give gamma/beta, so gamma = ratio × beta) and label_smoothing, and on the
trainer tokenizing in __init__ (tests/test_stages.py pins these).
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
class CPOStageConfig(PreferenceStageConfig):
    beta: float = 0.1            # reward scale (set with the short key `beta`); SimPO's recipes use 2.0-10
    loss_type: str = "sigmoid"   # sigmoid (CPO) | hinge | ipo | simpo
    cpo_alpha: float = 1.0       # weight of the chosen answer's NLL; SimPO: 0
    simpo_gamma: float = 0.5     # loss_type=simpo: the target reward margin gamma (absolute, not gamma/beta)
    label_smoothing: float = 0.0

    number_ranges: ClassVar[dict[str, Range]] = {
        "beta": Range(0, low_open=True, note=" CPO uses 0.1; SimPO's recipes 2.0-10."),
        "cpo_alpha": Range(0), "simpo_gamma": Range(0), "label_smoothing": Range(0, 0.5, high_open=True),
    }



def build_trainer(cfg: RunConfig, run: RunDir, start: StartingPoint, callbacks=()):
    # The trainer stack (transformers, peft, trl) loads when a run trains, not when a command is composed.
    from alignment.stages import common

    from trl.experimental.cpo import CPOConfig, CPOTrainer

    stage = cfg.stage
    return common.build_trainer(cfg, run, start, callbacks, CPOConfig, CPOTrainer, beta=stage.beta,
                                loss_type=stage.loss_type, cpo_alpha=stage.cpo_alpha, simpo_gamma=stage.simpo_gamma,
                                label_smoothing=stage.label_smoothing)


STAGE = register(Stage(
    name="cpo", loss_types_from=("experimental/cpo/cpo_config.py", "CPOConfig"), config=CPOStageConfig, description="contrastive preference optimisation; SimPO with "
    "loss_type=simpo cpo_alpha=0 (no reference model)", trainer="trl.experimental.cpo.CPOTrainer",
    data_format="preference", build_trainer=build_trainer, sequences_per_example=2, logit_bytes_per_vocab_entry=8,
    preference_metrics=True, experimental="trl.experimental.cpo",
))
