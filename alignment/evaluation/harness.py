"""Optional: EleutherAI's lm-evaluation-harness tasks (`pip install lm-eval`) on the evaluated model.

The harness loads the model itself (its `hf` model type, with `peft=` for an adapter) and reads each task's
data from the hub, so it needs the package, and the data in the local cache or a network. Only the
candidate is evaluated: benchmark scores compare across runs, not against the reference.
"""

from __future__ import annotations

from typing import Any

from alignment.errors import ConfigError
from alignment.config.schema import EvalConfig, RunConfig
from alignment.runtime.optional import require_importable
from alignment.models.modeling import uses_cuda


def check_harness(settings: EvalConfig) -> None:
    if not settings.lm_eval_tasks:
        return
    require_importable("lm_eval", f"eval.lm_eval_tasks={list(settings.lm_eval_tasks)} needs the "
                       f"lm-evaluation-harness (`lm_eval`)",
                       "Install it (`pip install lm-eval`) or leave eval.lm_eval_tasks empty.")
    if settings.lm_eval_limit is not None and settings.lm_eval_limit < 1:
        raise ConfigError(f"eval.lm_eval_limit must be null or >= 1 (got {settings.lm_eval_limit}).")


def model_arguments(weights: str, adapter: str | None, cfg: RunConfig) -> str:
    """The harness's `hf` model_args: weights, an adapter on them, dtype as the run trained."""
    arguments = [f"pretrained={weights}", f"dtype={cfg.model.dtype}"]
    if adapter:
        arguments.append(f"peft={adapter}")
    return ",".join(arguments)


def run_tasks(weights: str, adapter: str | None, cfg: RunConfig) -> dict[str, Any]:
    """Each task's metrics, as the harness reports them (its `results` dict)."""
    import lm_eval


    settings = cfg.eval
    output = lm_eval.simple_evaluate(model="hf", model_args=model_arguments(weights, adapter, cfg),
                                     tasks=list(settings.lm_eval_tasks), batch_size=settings.batch_size,
                                     device="cuda" if uses_cuda(cfg) else "cpu", limit=settings.lm_eval_limit)
    return {"tasks": list(settings.lm_eval_tasks), "limit": settings.lm_eval_limit,
            "results": (output or {}).get("results", {})}
