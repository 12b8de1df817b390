"""Evaluation: held-out preference accuracy from the implicit reward, generations, pairwise judges.

Modules: scoring (response log-probs, accuracy), generation (the fixed prompt set, sampled answers),
judges (rule, reward model, OpenAI-compatible HTTP), harness (optional lm-evaluation-harness tasks),
evaluate (what is compared, the outputs under eval/).
"""

from alignment.evaluation.evaluate import EVAL_DIR, evaluate, format_headline, subjects_of_config, subjects_of_run
from alignment.evaluation.judges import JudgeError, check_judge

__all__ = ["EVAL_DIR", "JudgeError", "check_judge", "evaluate", "format_headline", "subjects_of_config",
           "subjects_of_run"]
