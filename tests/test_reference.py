"""Every reference option trains DPO on the tiny twin with a reference that never moves.

Step-1 loss is ln 2 because each option's reference equals the starting policy; the reference's weights
are compared bit for bit before and after; adapter_copy holds a single base; precomputed log-probs are
reused (no reference forward pass) on a second run and recomputed when the data or truncation changes.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from alignment.plan.memory import parameter_count
from alignment.records.tracking import read_metrics

from .conftest import SHORT_DPO, train

pytestmark = pytest.mark.slow


def first_loss(outcome) -> float:
    return next(r["loss"] for r in read_metrics(outcome.run.metrics) if "loss" in r)


def base_weights(model) -> dict[str, torch.Tensor]:
    """A PEFT model's frozen base tensors under the plain model's parameter names."""
    return {n.removeprefix("base_model.model.").replace(".base_layer", ""): p.detach()
            for n, p in model.named_parameters() if "lora_" not in n}


def adapter_weights(model, adapter: str) -> dict[str, torch.Tensor]:
    """One adapter's tensors under the names peft saves them with (adapter name removed)."""
    return {n.replace(f".{adapter}.", "."): p.detach() for n, p in model.named_parameters()
            if f".{adapter}." in n and "lora_" in n}


def test_separate_reference_is_the_unchanged_model_at_ref_path(demo_run, tmp_path):
    sft_model = demo_run["dir"] / "1-sft" / "model"
    outcome = train(tmp_path, "dpo", *SHORT_DPO, f"parent_run={sft_model.parent}", "ref=separate",
                    f"ref.path={sft_model}")
    assert outcome.summary["reference"]["option"] == "separate"
    assert first_loss(outcome) == pytest.approx(math.log(2), abs=1e-4)
    start = dict(AutoModelForCausalLM.from_pretrained(sft_model).named_parameters())
    reference = dict(outcome.trainer.ref_model.named_parameters())
    assert reference.keys() == start.keys()
    assert all(torch.equal(p.detach(), start[n].detach()) for n, p in reference.items()), "reference moved"
    policy = dict(outcome.trainer.model.named_parameters())
    assert all(not torch.equal(p.detach(), start[n].detach()) for n, p in policy.items()), "policy did not train"
    optimised = {id(p) for group in outcome.trainer.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in reference.values()}, "the reference must not be optimised"


def test_base_reference_is_the_frozen_base_under_a_fresh_adapter(demo_run, tmp_path):
    sft = demo_run["dir"] / "1-sft"
    outcome = train(tmp_path, "dpo", *SHORT_DPO, f"parent_run={sft}", "peft=lora", "ref=auto")
    assert outcome.summary["reference"]["option"] == "base"  # what auto picks for a fresh adapter
    assert first_loss(outcome) == pytest.approx(math.log(2), abs=1e-4)
    start = dict(AutoModelForCausalLM.from_pretrained(sft / "model").named_parameters())
    base = base_weights(outcome.trainer.model)
    assert base.keys() == start.keys()
    assert all(torch.equal(t, start[n].detach()) for n, t in base.items()), "the base moved"
    assert outcome.trainer.ref_model is None


def test_adapter_copy_reference_is_the_parent_adapter_on_one_shared_base(lora_sft_run, tmp_path):
    outcome = train(tmp_path, "dpo", *SHORT_DPO, f"parent_run={lora_sft_run}", "peft=lora")
    summary = outcome.summary
    assert summary["reference"]["option"] == "adapter_copy"  # auto, with the parent's adapter kept
    assert summary["lineage"]["start"] == "parent adapter"
    assert summary["lineage"]["ancestors"][-1]["saved"] == "adapter"
    assert first_loss(outcome) == pytest.approx(math.log(2), abs=1e-4)

    model = outcome.trainer.model
    saved = load_file(lora_sft_run / "model" / "adapter_model.safetensors")
    reference, policy = adapter_weights(model, "ref"), adapter_weights(model, "default")
    assert reference.keys() == saved.keys()
    assert all(torch.equal(t, saved[n]) for n, t in reference.items()), "the reference adapter moved"
    assert any(not torch.equal(t, saved[n]) for n, t in policy.items()), "the policy adapter did not train"

    # One copy of the base: every non-adapter tensor is stored once and together they are the whole model.
    storage = {p.data_ptr(): p.numel() for n, p in model.named_parameters() if "lora_" not in n}
    arch = outcome.trainer.run_config.model.architecture
    assert sum(storage.values()) == parameter_count(arch)
    assert outcome.trainer.ref_model is None


def test_precomputed_reference_is_reused_and_recomputed_only_when_inputs_change(demo_run, tmp_path):
    # 300 rows: a selection no other test prepares, so the first run starts with no cache.
    parent, rows = f"parent_run={demo_run['dir'] / '1-sft'}", "dataset.rows=300"
    first = train(tmp_path, "first", *SHORT_DPO, parent, "ref=precomputed", rows)
    assert first_loss(first) == pytest.approx(math.log(2), abs=1e-4)
    assert first.summary["reference"]["reused"] is False
    assert first.summary["reference"]["forward_batches"] > 0
    assert first.trainer.ref_model is None

    # Another run that differs only in beta and the learning rate (a sweep member) reads the cache.
    again = train(tmp_path, "again", *SHORT_DPO, parent, "ref=precomputed", rows, "beta=0.5",
                  "learning_rate=5e-4")
    assert again.summary["reference"]["forward_batches"] == 0
    assert again.summary["reference"]["reused"] is True
    assert again.summary["reference"]["caches"] == first.summary["reference"]["caches"]
    assert first_loss(again) == pytest.approx(math.log(2), abs=1e-4)

    # Other rows, or another truncation, give another key: computed afresh, never the stale values.
    for name, change in [("rows", ["dataset.rows=200"]), ("length", [rows, "stage.max_length=200"])]:
        changed = train(tmp_path, name, *SHORT_DPO, parent, "ref=precomputed", *change)
        assert changed.summary["reference"]["forward_batches"] > 0, change
        assert changed.summary["reference"]["caches"]["train"] != first.summary["reference"]["caches"]["train"]


def test_merge_chains_dpo_from_an_adapter_parent_as_a_full_model(lora_sft_run, tmp_path):
    outcome = train(tmp_path, "dpo", *SHORT_DPO, f"parent_run={lora_sft_run}", "parent_adapter=merge")
    lineage = outcome.summary["lineage"]
    assert lineage["start"] == "merged parent adapter"
    merged = tmp_path / "dpo" / "merged_parent"
    assert lineage["weights"] == str(merged) and (merged / "config.json").exists()
    assert lineage["ancestors"][-1]["run_dir"] == str(lora_sft_run.resolve())
    assert outcome.summary["reference"]["option"] == "precomputed"  # auto for full fine-tuning
    assert first_loss(outcome) == pytest.approx(math.log(2), abs=1e-4)
    assert (tmp_path / "dpo" / "model" / "config.json").exists()  # a full model, not an adapter
