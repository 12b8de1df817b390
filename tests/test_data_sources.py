"""Each dataset config loads its committed fixture through the hub code path (only the source differs),
converts to TRL's format, and splits deterministically; local files of every supported form read the same."""

from __future__ import annotations

import json

import pytest

from alignment.preflight.compose import compose_run_config
from alignment.errors import ConfigError
from alignment.data import check_sources, prepare
from alignment.data.loading import locate

from .conftest import DATASET_FIXTURES, FIXTURES, dataset_config

# rows per split of each fixture: (train selected, eval selected)
EXPECTED_ROWS = {"ultrachat_200k": (50, 10), "ultrafeedback_binarized": (50, 10), "orpo_dpo_mix_40k": (59, 1)}


@pytest.mark.parametrize("option", DATASET_FIXTURES)
def test_each_dataset_config_prepares_its_fixture(option, tiny_tokenizer):
    cfg = dataset_config(option)
    assert locate(cfg.dataset).kind in ("split_files", "file")
    data = prepare(cfg, tiny_tokenizer)
    by_role = {c["role"]: c for c in data.report["composition"]}
    assert (by_role["train"]["selected"], by_role["eval"]["selected"]) == EXPECTED_ROWS[option]
    assert len(data.train) == by_role["train"]["kept"] and len(data.eval) == by_role["eval"]["kept"]
    if cfg.stage.name == "sft":
        assert data.train.column_names == ["messages"]
        assert all(row["messages"][-1]["role"] == "assistant" for row in data.train)
    else:
        assert data.train.column_names == ["prompt", "chosen", "rejected"]
        for row in data.train:
            assert row["prompt"][-1]["role"] == "user"
            assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]
            assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
    assert data.report["lint"]["findings"] == []


def test_system_messages_and_non_english_text_survive(tiny_tokenizer):
    data = prepare(dataset_config("ultrafeedback_binarized"), tiny_tokenizer)
    prompts = [row["prompt"] for row in data.train]
    assert any(p[0]["role"] == "system" for p in prompts)
    assert any("日本の首都" in p[-1]["content"] for p in prompts)
    assert any(len(p) >= 5 for p in prompts)  # multi-turn prompts keep their earlier exchanges


def _ids(data) -> list[str]:
    return sorted(row["prompt"][-1]["content"] for row in data)


def test_orpo_held_out_split_follows_the_seed(tiny_tokenizer):
    def held_out(seed):
        return _ids(prepare(dataset_config("orpo_dpo_mix_40k", f"seed={seed}", "dataset.test_size=0.1"),
                            tiny_tokenizer).eval)

    first, again, other = held_out(1), held_out(1), held_out(2)
    assert len(first) == 6 and first == again
    assert first != other


def test_parquet_and_saved_dataset_read_like_jsonl(tmp_path, tiny_tokenizer):
    from datasets import DatasetDict, load_dataset

    source = FIXTURES / "ultrafeedback_binarized"
    splits = {s: load_dataset("json", data_files=str(source / f"{s}.jsonl"), split="train")
              for s in ("train_prefs", "test_prefs")}
    (tmp_path / "parquet").mkdir()
    for name, split in splits.items():
        split.to_parquet(str(tmp_path / "parquet" / f"{name}.parquet"))
    DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))

    reference = prepare(dataset_config("ultrafeedback_binarized"), tiny_tokenizer)
    for path in (tmp_path / "parquet", tmp_path / "saved"):
        cfg = compose_run_config(["stage=dpo", "dataset=ultrafeedback_binarized", f"dataset.path={path}"])
        data = prepare(cfg, tiny_tokenizer)
        assert data.train.to_list() == reference.train.to_list()
        assert data.eval.to_list() == reference.eval.to_list()


def test_hub_id_offline_without_a_copy_says_how_to_point_at_one():
    cfg = compose_run_config(["stage=dpo", "dataset=ultrafeedback_binarized"])
    with pytest.raises(ConfigError, match=r"--local-dir data/ultrafeedback_binarized.*dataset.path="):
        check_sources(cfg.dataset, offline=True)


def test_a_single_file_cannot_also_provide_a_named_eval_split():
    path = FIXTURES / "ultrafeedback_binarized" / "train_prefs.jsonl"
    cfg = compose_run_config(["stage=dpo", "dataset=ultrafeedback_binarized", f"dataset.path={path}"])
    with pytest.raises(ConfigError, match="holds one split.*dataset.test_size=0.01.*dataset.eval_split=null"):
        check_sources(cfg.dataset, offline=True)


def test_a_missing_split_names_the_available_ones(tiny_tokenizer):
    """Refused when the run is checked (validate, dry runs included), before anything loads."""
    with pytest.raises(ConfigError, match="split 'test_gen' not found.*available: test_prefs, train_prefs"):
        dataset_config("ultrafeedback_binarized", "dataset.eval_split=test_gen")


def test_fixtures_follow_the_real_column_sets():
    from alignment.data import SCHEMAS

    for option, schema in (("ultrachat_200k", "ultrachat"), ("ultrafeedback_binarized", "ultrafeedback"),
                           ("orpo_dpo_mix_40k", "orpo")):
        path = DATASET_FIXTURES[option][1]
        files = [path] if path.is_file() else sorted(path.glob("*.jsonl"))
        for file in files:
            for line in file.read_text().splitlines():
                assert tuple(json.loads(line)) == SCHEMAS[schema].columns, file
