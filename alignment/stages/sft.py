"""Supervised fine-tuning on chat data with TRL's SFTTrainer."""

from __future__ import annotations

from ..config import RunConfig
from ..rundir import RunDir
from ..start import StartingPoint
from . import common


def build_trainer(cfg: RunConfig, run: RunDir, start: StartingPoint, callbacks=()):
    from trl import SFTConfig, SFTTrainer

    return common.build_trainer(
        cfg, run, start, callbacks, SFTConfig, SFTTrainer,
        packing=cfg.stage.packing,
        assistant_only_loss=cfg.stage.assistant_only_loss,
        loss_type=cfg.stage.loss_type,
    )
