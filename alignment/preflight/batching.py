"""The batching settings checked before anything loads: stage.batching, stage.padding_free, stage.use_liger_kernel.

What they do is in alignment/stages/batching.py and alignment/stages/padding_free.py; here is only what makes a
command invalid, so that a setting that would be ignored or fail after the model loads is refused at once.
"""

from __future__ import annotations

import importlib.util

from alignment.config.schema import RunConfig
from alignment.errors import ConfigError, one_of
from alignment.plan.batch import batching_strategy
from alignment.models.modeling import uses_cuda

BATCHING_CHOICES = ("auto", "length", "random")
# The attention implementations a packed row can use: flash-attention 2 as it is, sdpa and eager through the
# per-sequence sdpa that alignment/stages/padding_free.py registers.
PACKING_ATTENTION = ("flash_attention_2", "sdpa", "eager")


def check_batching(cfg: RunConfig) -> None:
    stage = cfg.stage
    if not hasattr(stage, "batching"):  # a stage that trains nothing
        return
    one_of("stage.batching", stage.batching, BATCHING_CHOICES)
    batching_strategy(stage)
    if getattr(stage, "padding_free", False) and cfg.model.attn_implementation not in PACKING_ATTENTION:
        raise ConfigError(f"stage.padding_free=true needs an attention implementation that keeps packed sequences "
                          f"apart ({', '.join(PACKING_ATTENTION)}); got model.attn_implementation="
                          f"{cfg.model.attn_implementation}. Set model.attn_implementation=sdpa, or "
                          f"stage.padding_free=false.")
    if stage.use_liger_kernel:
        if importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError("stage.use_liger_kernel=true needs the liger-kernel package: pip install liger-kernel "
                              "(or set stage.use_liger_kernel=false).")
        if not uses_cuda(cfg):
            raise ConfigError("stage.use_liger_kernel=true needs a CUDA device (Liger's kernels are Triton GPU "
                              "kernels); this run trains on CPU. Set stage.use_liger_kernel=false.")
