"""The evaluation stage: trains nothing, evaluates a run or a model (alignment/evaluation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from alignment.config.schema import StageConfig
from alignment.config.registry import Stage, register


@dataclass
class EvalStageConfig(StageConfig):
    # The prompt budget applied to the eval split, as in training; null: max_length - 1.
    max_prompt_length: Optional[int] = None


STAGE = register(Stage(
    name="eval", config=EvalStageConfig, description="evaluation of a run or model (no training)",
    trainer="alignment.evaluation (no training)",
    data_format="preference",  # its accuracy reads pairs (chosen vs rejected); its prompts come from them too
))
