"""Per-model settings: attention fallback, chat templates, and the architecture facts the checks rely on."""

from __future__ import annotations

import logging

import pytest

from alignment.preflight.compose import compose_run_config
from alignment.models.modeling import attention_implementation, linear_module_names, load_tokenizer
from alignment.models.start import resolve_start
from alignment.models.templates import ZEPHYR_TEMPLATE


def test_flash_attention_falls_back_to_sdpa_without_cuda_or_flash_attn(caplog):
    cfg = compose_run_config(["model.attn_implementation=flash_attention_2", "backend.device=cpu"])
    with caplog.at_level(logging.INFO, logger="alignment.models.modeling"):
        assert attention_implementation(cfg) == "sdpa"
    assert "flash_attention_2 unavailable (no CUDA device)" in caplog.text
    assert "flash_attention_2 is not available here, using sdpa instead" in caplog.text


def test_available_attention_is_kept_and_eager_is_the_last_resort():
    assert attention_implementation(compose_run_config(["model.attn_implementation=sdpa"])) == "sdpa"
    assert attention_implementation(compose_run_config(["model.attn_implementation=eager"])) == "eager"


@pytest.mark.parametrize("model", ["mistral7b", "qwen72b"])
def test_big_models_ask_for_flash_attention_and_name_their_tokenizer_settings(model):
    cfg = compose_run_config([f"model={model}"])
    assert cfg.model.attn_implementation == "flash_attention_2"
    assert cfg.model.tokenizer.pad_token is not None
    assert cfg.model.tokenizer.pad_token != "</s>" and cfg.model.tokenizer.pad_token != "<|im_end|>"


def test_qwen72b_uses_seed_000_pad_token():
    assert compose_run_config(["model=qwen72b"]).model.tokenizer.pad_token == "<|image_pad|>"


def test_linear_modules_come_from_the_real_class_on_the_meta_device():
    model = compose_run_config(["model=qwen72b"]).model
    assert linear_module_names(model) == ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj",
                                         "up_proj", "v_proj"]


def test_zephyr_template_renders_role_tags_and_keeps_the_prompt_a_prefix():
    cfg = compose_run_config(["model.tokenizer.chat_template=zephyr"])
    tokenizer = load_tokenizer(resolve_start(cfg).tokenizer, cfg.model)
    assert tokenizer.chat_template == ZEPHYR_TEMPLATE
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    answer = [{"role": "assistant", "content": "4"}]
    eos = tokenizer.eos_token
    rendered_prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
    assert rendered_prompt == f"<|system|>\nBe brief.{eos}\n<|user|>\n2+2?{eos}\n<|assistant|>\n"
    assert full == rendered_prompt + f"4{eos}\n"


def test_a_checkpoint_that_differs_from_the_declared_architecture_is_refused(tmp_path):
    from alignment.errors import ConfigError
    from alignment.models.modeling import check_architecture

    cfg = compose_run_config([])
    source = resolve_start(cfg).weights
    check_architecture(source, cfg)  # the twin matches its own facts
    wrong = compose_run_config(["model.architecture.intermediate_size=192"])
    with pytest.raises(ConfigError, match="intermediate_size: 192 in model=tiny_qwen2, 160 in config.json"):
        check_architecture(source, wrong)
