"""The template linter finds each chat-template bug on a crafted example and nothing on the clean fixtures."""

from __future__ import annotations

import copy

import pytest

from alignment.errors import ConfigError
from alignment.data import prepare
from alignment.data.lint import lint
from alignment.models.templates import CHATML_TEMPLATE

from .conftest import DATASET_FIXTURES, dataset_config

ROW = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}],
       "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "6"}],
       "__source": "crafted", "__row": 7}

# Each entry: how to break a copy of the tiny tokenizer (or the row), and the finding it must produce.
BREAKAGES = {
    "duplicate_bos": lambda tok, row: (tok.add_special_tokens({"bos_token": "<s>"}),
                                       setattr(tok, "chat_template", "{{ bos_token }}{{ bos_token }}" + CHATML_TEMPLATE)),
    # Data that already ends with the EOS text, which the template appends again.
    "duplicate_eos": lambda tok, row: row["chosen"][0].update(content="5<|im_end|>"),
    # A template that never closes assistant turns.
    "missing_eos": lambda tok, row: setattr(tok, "chat_template", CHATML_TEMPLATE.replace(
        "message['content'] + '<|im_end|>' }}{% endgeneration %}", "message['content'] }}{% endgeneration %}")),
    # A generation prompt that opens an empty think block the finished turns do not have.
    "prompt_not_prefix": lambda tok, row: setattr(tok, "chat_template", CHATML_TEMPLATE.replace(
        "{{- '<|im_start|>assistant\\n' }}{%- endif %}", "{{- '<|im_start|>assistant\\n<think></think>' }}{%- endif %}")),
    "pad_equals_eos": lambda tok, row: setattr(tok, "pad_token", tok.eos_token),
}


def _broken(check, tiny_tokenizer):
    tokenizer, row = copy.deepcopy(tiny_tokenizer), copy.deepcopy(ROW)
    BREAKAGES[check](tokenizer, row)
    return tokenizer, row


def test_the_crafted_row_is_clean_with_the_real_template(tiny_tokenizer):
    assert lint(tiny_tokenizer, [ROW], "preference") == []


@pytest.mark.parametrize("check", BREAKAGES)
def test_each_finding_is_detected_with_an_example(check, tiny_tokenizer):
    tokenizer, row = _broken(check, tiny_tokenizer)
    findings = {f.check: f for f in lint(tokenizer, [row], "preference")}
    assert check in findings, findings
    finding = findings[check]
    assert finding.rows == 1 and finding.example["source"] == "crafted" and finding.example["row"] == 7
    assert finding.advice
    assert finding.severity == ("warning" if check == "pad_equals_eos" else "error")
    assert set(findings) == {check}  # each breakage trips its own check only


@pytest.mark.parametrize("option", DATASET_FIXTURES)
def test_clean_fixtures_have_no_findings(option, tiny_tokenizer):
    cfg = dataset_config(option, "dataset.lint_rows=200")
    assert prepare(cfg, tiny_tokenizer).report["lint"]["findings"] == []


def test_lint_errors_stop_before_training_unless_set_to_warn(tiny_tokenizer):
    tokenizer, _ = _broken("missing_eos", tiny_tokenizer)
    with pytest.raises(ConfigError, match="(?s)missing_eos.*dataset.lint=warn"):
        prepare(dataset_config("ultrafeedback_binarized"), tokenizer)
    data = prepare(dataset_config("ultrafeedback_binarized", "dataset.lint=warn"), tokenizer)
    assert [f["check"] for f in data.report["lint"]["findings"]] == ["missing_eos"]
    assert data.report["lint"]["findings"][0]["rows"] == data.report["lint"]["rows_checked"] > 0
