"""Every class of bad row is reported with its row index and field before training; drop mode counts it.

The broken files (tests/fixtures/broken, written by tests/fixtures/generate.py) are ten valid
ultrafeedback rows with one defect each, at the row named here.
"""

from __future__ import annotations

import pytest

from alignment.preflight.compose import compose_run_config
from alignment.errors import ConfigError
from alignment.data import prepare

from .conftest import FIXTURES

BROKEN = {  # file → (problem kind, row, field, words of the message)
    "roles_not_alternating": ("roles", 4, "chosen[0].role", "is 'assistant' where 'user' was expected"),
    "empty_content": ("empty", 2, "rejected[5].content", "is empty"),
    "identical": ("identical", 5, "chosen[1].content", "equals the rejected response"),
    "prompt_mismatch": ("prompt_mismatch", 3, "rejected[0].content", "differs from chosen[0]"),
    "non_string_content": ("malformed", 6, "chosen[2].content", "is int, expected a string"),
    "unknown_role": ("malformed", 1, "chosen[2].role", "is 'bot', expected one of"),
}


def _config(name: str, *overrides: str):
    return compose_run_config(["stage=dpo", "dataset=ultrafeedback_binarized",
                               f"dataset.path={FIXTURES / 'broken' / f'{name}.jsonl'}", "dataset.eval_split=null",
                               *overrides])


@pytest.mark.parametrize("name", BROKEN)
def test_each_bad_row_class_fails_with_row_and_field(name, tiny_tokenizer):
    kind, row, field, words = BROKEN[name]
    with pytest.raises(ConfigError) as caught:
        prepare(_config(name, f"dataset.bad_rows.{kind}=fail"), tiny_tokenizer)
    message = str(caught.value)
    assert f"row {row}: {field} {words}" in message
    assert f"{name}.jsonl" in message and f"dataset.bad_rows.{kind}=drop" in message


@pytest.mark.parametrize("name", BROKEN)
def test_drop_mode_drops_and_counts_exactly_the_bad_row(name, tiny_tokenizer):
    kind = BROKEN[name][0]
    data = prepare(_config(name, f"dataset.bad_rows.{kind}=drop"), tiny_tokenizer)
    train = data.report["composition"][0]
    assert train["dropped"].get(kind) == 1
    assert sum(train["dropped"].values()) - train["dropped"].get("prompt_over_budget", 0) == 1
    assert len(data.train) == train["kept"] == 10 - sum(train["dropped"].values())


def test_schema_errors_fail_by_default_and_content_errors_drop(tiny_tokenizer):
    with pytest.raises(ConfigError, match="row 4: chosen\\[0\\].role"):
        prepare(_config("roles_not_alternating"), tiny_tokenizer)
    data = prepare(_config("identical"), tiny_tokenizer)
    assert data.report["composition"][0]["dropped"]["identical"] == 1


def test_missing_columns_name_the_expected_schema(tiny_tokenizer):
    with pytest.raises(ConfigError, match="no column\\(s\\) chosen, rejected.*HuggingFaceH4/ultrafeedback_binarized "
                                          "schema have prompt, prompt_id, chosen.*found: question, answer"):
        prepare(_config("missing_column"), tiny_tokenizer)


def test_bad_rows_stop_the_cli_before_any_weights_load(tmp_path):
    from .conftest import run_cli

    result = run_cli("stage=dpo", "dataset=ultrafeedback_binarized", "dataset.eval_split=null",
                     f"dataset.path={FIXTURES / 'broken' / 'unknown_role.jsonl'}", f"run_dir={tmp_path / 'run'}",
                     cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "row 1: chosen[2].role is 'bot'" in result.stderr
    assert not (tmp_path / "run" / "model").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()
