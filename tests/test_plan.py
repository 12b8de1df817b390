"""The memory planner: the seeds' verdicts for 70B/72B runs, and its terms against what the tiny twins hold."""

from __future__ import annotations

import pytest
import torch

from alignment.preflight.compose import compose_run_config
from alignment.config.schema import ArchitectureConfig
from alignment.plan.memory import GB, PlanInputs, parameter_count, plan_inputs, plan_memory
from alignment.models.start import resolve_start

from .conftest import SHORT_DPO, run_cli, train

# A 70B Llama-family decoder (Llama-2-70B's config.json), the model of seed 003's arithmetic.
LLAMA_70B = ArchitectureConfig(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                               num_key_value_heads=8, intermediate_size=28672, vocab_size=32000)


def seed_003(**changes) -> PlanInputs:
    settings = dict(arch=LLAMA_70B, stage="dpo", dtype="bfloat16", peft="none", reference="separate",
                    optimizer="adamw_torch", backend="ddp", world_size=8, micro_batch=1, seq_len=1024,
                    checkpointing=True, gpu_memory_gb=80)
    return PlanInputs(**{**settings, **changes})


def test_seed_003_full_parameter_70b_dpo_does_not_fit_on_8_h100s():
    plan = plan_memory(seed_003())
    assert parameter_count(LLAMA_70B) == pytest.approx(70e9, rel=0.02)
    # The seed's arithmetic: policy ≈ 140 GB, reference ≈ 140 GB, two 16-bit AdamW states ≈ 280 GB.
    assert plan.terms["weights"] / GB == pytest.approx(140, rel=0.02)
    assert plan.terms["reference"] / GB == pytest.approx(140, rel=0.02)
    assert plan.terms["optimizer"] / GB == pytest.approx(280, rel=0.02)
    assert not plan.fits
    assert (plan.terms["weights"] + plan.terms["reference"] + plan.terms["optimizer"]) / GB > 8 * 80 * 0.85
    assert any("backend=fsdp" in tip for tip in plan.advice())

    sharded_only = plan_memory(seed_003(backend="fsdp"))
    assert not sharded_only.fits and any("peft=lora" in tip for tip in sharded_only.advice())
    for backend in ("fsdp", "zero3"):
        assert plan_memory(seed_003(backend=backend, peft="lora", reference="base")).fits


@pytest.mark.parametrize("backend", ["fsdp", "zero3"])
def test_seed_000_72b_qlora_dpo_with_adapter_copy_fits_on_2_h100s(backend):
    cfg = compose_run_config(["model=qwen72b", "stage=dpo", "peft=qlora", "stage.max_length=512",
                              "stage.per_device_train_batch_size=1", "launcher.num_processes=2"])
    plan = plan_memory(plan_inputs(cfg, "adapter_copy", backend=backend))
    assert plan.fits, plan.format()
    assert plan.largest == "weights"
    assert plan.terms["reference"] == plan.terms["trainable weights"]  # the reference is one adapter copy
    assert 20 < plan.terms["weights"] / GB < 40  # 4-bit base halved over two GPUs
    # Without 4-bit and without LoRA the same run is far out of reach of two GPUs.
    full = plan_memory(plan_inputs(compose_run_config(["model=qwen72b", "stage=dpo", "launcher.num_processes=2"]),
                                   "separate", backend=backend))
    assert not full.fits


@pytest.mark.slow  # a CLI dry run (~5 s); the fast tier keeps one of each kind
def test_dry_run_prints_the_plan_and_the_backends_it_would_fit(tmp_path, planning):
    result = run_cli("model=qwen72b", "stage=dpo", "peft=qlora", "stage.per_device_train_batch_size=1", "backend=fsdp",
                     "stage.max_length=512", "stage.max_prompt_length=256", "launcher.num_processes=2", "dry_run=true",
                     cwd=tmp_path, env=planning)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "memory plan per device" in result.stdout and "verdict: fits" in result.stdout
    assert "same run on 2 GPUs per device: ddp" in result.stdout and "fsdp" in result.stdout


def saved_activation_bytes(model, **batch) -> int:
    """Bytes autograd keeps for backward during one forward pass (parameters excluded)."""
    params = {p.data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        if tensor.data_ptr() not in params:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch)
    return sum(storages.values())


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_planned_activations_match_what_autograd_saves(peft):
    cfg = compose_run_config(["stage=sft", f"peft={peft}", "model.architecture.hidden_size=128",
                              "model.architecture.intermediate_size=352", "stage.max_length=256",
                              "stage.per_device_train_batch_size=4"])
    planned, measured = planned_and_saved_activations(cfg, resolve_start(cfg).weights)
    assert planned == pytest.approx(measured, rel=0.10)


def planned_and_saved_activations(cfg, weights) -> tuple[float, int]:
    """(planned activations + logits, bytes autograd saves) for one forward of 4 × 256 tokens of an SFT cfg."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from alignment.models.modeling import lora_config

    model = AutoModelForCausalLM.from_pretrained(str(weights), attn_implementation="sdpa")
    if cfg.peft.method != "none":
        model = get_peft_model(model, lora_config(cfg.peft))
    model.train()
    ids = torch.randint(0, 600, (4, 256), generator=torch.Generator().manual_seed(0))
    measured = saved_activation_bytes(model, input_ids=ids, labels=ids)
    plan = plan_memory(plan_inputs(cfg, "base"))
    return plan.terms["activations"] + plan.terms["logits"], measured


@pytest.mark.slow
@pytest.mark.parametrize("peft, reference", [("none", "separate"), ("lora", "base")])
def test_planned_weights_optimizer_and_reference_match_the_trained_tiny_twin(demo_run, tmp_path, peft, reference):
    sft_model = demo_run["dir"] / "1-sft" / "model"
    ref_path = [f"ref.path={sft_model}"] if reference == "separate" else []
    outcome = train(tmp_path, "dpo", *SHORT_DPO, f"parent_run={sft_model.parent}", f"peft={peft}",
                    f"ref={reference}", *ref_path)
    trainer, cfg = outcome.trainer, outcome.trainer.run_config
    plan = plan_memory(plan_inputs(cfg, reference))

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    params = dict(trainer.model.named_parameters())
    frozen = [p for n, p in params.items() if "lora_" not in n]
    trainable = [p for p in params.values() if p.requires_grad]
    states = [t for state in trainer.optimizer.state.values() for k, t in state.items() if k != "step"]
    assert nbytes(frozen) == plan.terms["weights"]
    assert nbytes(states) == plan.terms["optimizer"]
    assert nbytes(trainable) == plan.terms["gradients"]  # one gradient per trainable parameter
    if peft == "lora":
        assert nbytes(trainable) == plan.terms["trainable weights"]
    reference_bytes = nbytes(trainer.ref_model.parameters()) if trainer.ref_model is not None else 0
    assert reference_bytes == plan.terms["reference"]
