"""LoRA on the tiny twin: only adapters train, the saved adapter reproduces the model, merging is exact."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from alignment.preflight.compose import compose_run_config
from alignment.models.start import adapter_base, merge_adapter

from .conftest import train
from .test_reference import base_weights

pytestmark = pytest.mark.slow


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_lora_trains_only_adapters_and_its_saved_and_merged_forms_give_the_same_logits(tmp_path):
    overrides = ["stage=sft", "peft=lora", "stage.max_steps=6", "learning_rate=3e-3", "stage.max_length=256",
                 "stage.global_batch_size=8"]
    outcome = train(tmp_path, "sft", *overrides)
    model = outcome.trainer.model
    saved_adapter = outcome.run.model
    base_path = adapter_base(saved_adapter)
    start = dict(AutoModelForCausalLM.from_pretrained(base_path).named_parameters())

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(torch.equal(t, start[n].detach()) for n, t in base_weights(model).items()), "a base weight moved"
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n), "adapters did not train"

    input_ids = torch.randint(0, 600, (2, 48), generator=torch.Generator().manual_seed(0))
    in_memory = logits(model, input_ids)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(saved_adapter))
    assert torch.allclose(logits(reloaded, input_ids), in_memory, atol=1e-6, rtol=0)

    # The adapter changed the model: comparing against the bare base shows the check can fail.
    assert not torch.allclose(logits(AutoModelForCausalLM.from_pretrained(base_path), input_ids), in_memory,
                              atol=1e-3)

    cfg = compose_run_config(overrides)
    merged_dir = merge_adapter(saved_adapter, tmp_path / "merged", cfg)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert torch.allclose(logits(merged, input_ids), in_memory, atol=1e-5, rtol=0)
