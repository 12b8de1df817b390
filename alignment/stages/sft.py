"""Supervised fine-tuning on chat data with TRL's SFTTrainer."""

from __future__ import annotations

from dataclasses import dataclass

from alignment.config.schema import RunConfig, TrainingStageConfig
from alignment.records.rundir import RunDir
from alignment.models.start import StartingPoint
from alignment.config.registry import Stage, register


@dataclass
class SFTStageConfig(TrainingStageConfig):
    packing: bool = False               # pack several conversations into each max_length sequence
    assistant_only_loss: bool = False   # loss on assistant tokens only (needs {% generation %} in the template)
    loss_type: str = "nll"              # TRL: nll | dft


def build_trainer(cfg: RunConfig, run: RunDir, start: StartingPoint, callbacks=()):
    # The trainer stack (transformers, peft, trl) loads when a run trains, not when a command is composed.
    from alignment.stages import common

    from trl import SFTConfig, SFTTrainer

    return common.build_trainer(
        cfg, run, start, callbacks, SFTConfig, SFTTrainer,
        packing=cfg.stage.packing,
        assistant_only_loss=cfg.stage.assistant_only_loss,
        loss_type=cfg.stage.loss_type,
    )


STAGE = register(Stage(
    name="sft", loss_types_from=("trainer/sft_config.py", "SFTConfig"), config=SFTStageConfig, description="supervised fine-tuning on chat data",
    trainer="trl.SFTTrainer", data_format="chat", build_trainer=build_trainer,
    sequences_per_example=1,
    # SFT materialises the logits (compute dtype), their fp32 upcast for the loss and its gradient.
    logit_bytes_per_vocab_entry=8,
))
