"""Direct preference optimisation with TRL's DPOTrainer.

The reference model: with full fine-tuning TRL loads a frozen copy from the policy's own saved path
(`source` is always a saved directory: a tiny twin's cache, a parent run's model/ or a hub snapshot);
with LoRA it disables the adapter instead, so no second copy of the base is held in memory.
"""

from __future__ import annotations

from pathlib import Path

from ..config import RunConfig
from ..rundir import RunDir
from . import common


def build_trainer(cfg: RunConfig, run: RunDir, source: Path | str, callbacks=()):
    from trl import DPOConfig, DPOTrainer

    return common.build_trainer(
        cfg, run, source, callbacks, DPOConfig, DPOTrainer,
        beta=cfg.beta,
        loss_type=[cfg.stage.loss_type],
    )
