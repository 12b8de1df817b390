"""DPO from an SFT run: the policy moves, the reference stays exactly the SFT weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignment.compose import compose_run_config
from alignment.runner import run_stage
from alignment.validation import validate

pytestmark = pytest.mark.slow


def test_policy_changes_and_reference_is_the_unchanged_sft_model(demo_run, tmp_path):
    sft = demo_run["dir"] / "1-sft"
    cfg = compose_run_config(["stage=dpo", "stage.max_steps=5", "stage.max_length=256", "stage.max_prompt_length=128", "learning_rate=1e-3",
                              f"parent_run={sft}", f"run_dir={tmp_path / 'dpo'}"])
    validate(cfg)
    outcome = run_stage(cfg)
    assert outcome.summary["status"] == "finished"

    start = dict(AutoModelForCausalLM.from_pretrained(sft / "model").named_parameters())
    policy = dict(outcome.trainer.model.named_parameters())
    reference = dict(outcome.trainer.ref_model.named_parameters())
    changed = [n for n, p in policy.items() if not torch.equal(p.detach(), start[n].detach())]
    assert len(changed) == len(policy), "every trainable tensor should have moved"
    for name, param in reference.items():
        assert torch.equal(param.detach(), start[name].detach()), f"reference changed: {name}"
    optimised = {id(p) for group in outcome.trainer.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in reference.values()}, "the reference must not be optimised"
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "dpo" / "model")
    assert all(torch.equal(p, policy[n].detach()) for n, p in saved.named_parameters())
