"""peft=qlora on the tiny twin, on this CPU: bitsandbytes 4-bit base, LoRA adapters, DPO against the base."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from alignment.preflight.compose import compose_run_config
from alignment.errors import ConfigError
from alignment.runner import run_stage
from alignment.records.tracking import read_metrics
from alignment.preflight.validation import validate

SETTINGS = ["stage=dpo", "peft=qlora", "stage.max_steps=4", "stage.max_length=256", "stage.max_prompt_length=128",
            "learning_rate=1e-3", "stage.eval_steps=null", "stage.per_device_train_batch_size=8",
            "stage.global_batch_size=8"]


@pytest.mark.slow
def test_qlora_dpo_trains_adapters_on_a_frozen_4bit_base(tmp_path):
    from bitsandbytes.nn import Linear4bit

    cfg = compose_run_config([*SETTINGS, f"run_dir={tmp_path / 'run'}"])
    validate(cfg)
    outcome = run_stage(cfg)
    model = outcome.trainer.model
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert layers, "the base was not quantized"
    assert all(m.weight.dtype == torch.bfloat16 for m in layers)  # quant_storage=bfloat16: shardable by FSDP
    assert all(m.weight.quant_state.quant_type == "nf4" for m in layers)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: nonzero means the adapters trained

    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference (adapter off) at step 0
    assert all(math.isfinite(loss) for loss in losses)
    assert (tmp_path / "run" / "model" / "adapter_config.json").exists()


def test_qlora_settings_are_validated():
    with pytest.raises(ConfigError, match="peft.quant_type=int3 is not supported"):
        validate(compose_run_config([*SETTINGS, "peft.quant_type=int3"]))


def test_qlora_without_bitsandbytes_fails_before_loading(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(ConfigError, match="peft=qlora needs bitsandbytes.*use peft=lora"):
        validate(compose_run_config(SETTINGS))
