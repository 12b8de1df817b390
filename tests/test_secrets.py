"""Secrets from the environment never reach config.yaml, summary.json, metrics or run.log."""

from __future__ import annotations

import logging

import pytest

from alignment.secrets import MASK, RedactingFilter, is_secret_key, redact

from .conftest import run_cli

TOKEN = "hf_FAKEtoken0123456789abcdef"


@pytest.mark.parametrize("key", ["hf_token", "HF_TOKEN", "WANDB_API_KEY", "api_key", "db.password", "secret"])
def test_secret_keys(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["tokenizer", "pad_token", "eos_token", "max_new_tokens", "eval_mean_token_accuracy"])
def test_ordinary_keys(key):
    assert not is_secret_key(key)


def test_redact_masks_keys_and_embedded_values(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    cleaned = redact({"hub": {"token": "abc"}, "url": f"https://x/?t={TOKEN}", "tokenizer": {"pad_token": "<p>"}})
    assert cleaned == {"hub": {"token": MASK}, "url": f"https://x/?t={MASK}", "tokenizer": {"pad_token": "<p>"}}


def test_log_filter_removes_secret_values(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", TOKEN)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "using key %s", (TOKEN,), None)
    RedactingFilter().filter(record)
    assert TOKEN not in record.getMessage() and MASK in record.getMessage()


@pytest.mark.slow
def test_no_secret_in_any_file_of_a_run(tmp_path):
    env = {"HF_TOKEN": TOKEN, "WANDB_API_KEY": TOKEN[::-1]}
    # The token also appears in a config value (a run name), as a careless user might pass it.
    result = run_cli("stage=sft", "stage.max_steps=2", "stage.global_batch_size=8", f"run_name=leak-{TOKEN}", f"run_dir={tmp_path / 'run'}",
                     cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file() and p.suffix in (".yaml", ".json", ".jsonl", ".log")]
    assert {p.name for p in files} >= {"config.yaml", "summary.json", "metrics.jsonl", "run.log"}
    for path in files:
        text = path.read_text()
        assert TOKEN not in text and TOKEN[::-1] not in text, path
    assert TOKEN not in result.stdout + result.stderr
