"""Mixing by fraction or row count, the prompt budget, and the prepared-data cache."""

from __future__ import annotations

import shutil

import pytest

from alignment.preflight.compose import compose_run_config
from alignment.data import prepare
from alignment.data.lengths import measure_chat, measure_preference, template_ids

from .conftest import DATASET_FIXTURES, dataset_config

ORPO = DATASET_FIXTURES["orpo_dpo_mix_40k"][1]


def _mixed(*overrides: str):
    mix = f"dataset.mix=[{{name: orpo, schema: orpo, path: {ORPO}, test_size: 0.05, fraction: 0.3}}]"
    return dataset_config("ultrafeedback_binarized", "dataset.fraction=0.5", mix, *overrides)


def test_mixer_proportions_hold_and_the_composition_is_recorded(tiny_tokenizer):
    data = prepare(_mixed(), tiny_tokenizer)
    rows = {(c["source"], c["role"]): c for c in data.report["composition"]}
    assert abs(rows["ultrafeedback_binarized", "train"]["selected"] - 0.5 * 50) <= 1
    held_out = 3  # ceil(0.05 * 60)
    assert rows["orpo", "eval"]["selected"] == held_out
    assert abs(rows["orpo", "train"]["selected"] - 0.3 * (60 - held_out)) <= 1
    assert rows["ultrafeedback_binarized", "eval"]["selected"] == 10
    kept_train = sum(c["kept"] for c in data.report["composition"] if c["role"] == "train")
    assert len(data.train) == kept_train == data.report["totals"]["train"]["kept"]


def test_rows_pick_an_exact_count_and_the_seed_fixes_which(tiny_tokenizer):
    def picked(seed):
        data = prepare(dataset_config("ultrafeedback_binarized", "dataset.rows=12", "dataset.bad_rows.empty=fail",
                                      f"seed={seed}"), tiny_tokenizer)
        assert data.report["composition"][0]["selected"] == 12
        return sorted(row["prompt"][-1]["content"] for row in data.train)

    assert picked(3) == picked(3) != picked(4)


def _long_turn(words: int) -> str:
    return " ".join(["committee figures"] * words)


def test_prompt_budget_drops_oldest_turns_and_keeps_the_final_user_turn(tiny_tokenizer):
    final = {"role": "user", "content": "And the total?"}
    prompt = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": _long_turn(200)}, {"role": "assistant", "content": "Read."},
              {"role": "user", "content": _long_turn(30)}, {"role": "assistant", "content": "Noted."}, final]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "Twelve in total."}],
           "rejected": [{"role": "assistant", "content": "No idea."}]}
    full_prompt = len(template_ids(tiny_tokenizer, prompt, add_generation_prompt=True))
    budget = len(template_ids(tiny_tokenizer, [prompt[0], *prompt[3:]], add_generation_prompt=True))
    assert full_prompt > budget

    measured = measure_preference(tiny_tokenizer, row, max_length=budget + 64, budget=budget)
    kept = measured["row"]["prompt"]
    assert kept == [prompt[0], *prompt[3:]]  # system kept, oldest exchange gone, final user turn whole
    assert measured["turns_dropped"] == 2 and measured["prompt_tokens"] <= budget
    assert measured["row"]["chosen"] == row["chosen"] and measured["row"]["rejected"] == row["rejected"]
    assert not measured["cut"]

    too_small = len(template_ids(tiny_tokenizer, [prompt[0], final], add_generation_prompt=True)) - 1
    assert measure_preference(tiny_tokenizer, row, max_length=512, budget=too_small) == {"drop": "prompt_over_budget"}


def test_a_chat_row_with_no_response_inside_max_length_is_dropped(tiny_tokenizer):
    row = {"messages": [{"role": "user", "content": _long_turn(100)}, {"role": "assistant", "content": "Yes."}]}
    assert measure_chat(tiny_tokenizer, row, max_length=64) == {"drop": "response_beyond_max_length"}
    assert measure_chat(tiny_tokenizer, row, max_length=4096)["cut"] is False


def test_prepared_prompts_respect_the_budget_and_drops_are_counted(tiny_tokenizer):
    cfg = dataset_config("ultrafeedback_binarized", "stage.max_length=256", "stage.max_prompt_length=96")
    data = prepare(cfg, tiny_tokenizer)
    train = data.report["totals"]["train"]
    assert train["prompts_shortened"] > 0 and train["dropped"]["prompt_over_budget"] > 0
    assert data.report["lengths"]["train"]["prompt"]["max"] <= 96
    for row in data.train:
        assert len(template_ids(tiny_tokenizer, row["prompt"], add_generation_prompt=True)) <= 96
        assert row["prompt"][-1]["role"] == "user"


def test_max_prompt_length_is_ours_trl_gets_only_max_length(tmp_path):
    from trl import DPOConfig

    from alignment.records.rundir import RunDir
    from alignment.stages.common import trainer_arguments

    assert "max_prompt_length" not in DPOConfig.__dataclass_fields__  # TRL 1.x removed it
    cfg = compose_run_config(["stage=dpo"])
    arguments = trainer_arguments(cfg, RunDir(tmp_path), has_eval=False)
    assert cfg.stage.max_prompt_length == 512 and "max_prompt_length" not in arguments
    assert arguments["max_length"] == cfg.stage.max_length == 1024


def test_second_prepare_reuses_the_cache_and_changes_invalidate_it(tmp_path, tiny_tokenizer, monkeypatch):
    import alignment.data.pipeline as pipeline

    source = tmp_path / "prefs"
    shutil.copytree(DATASET_FIXTURES["ultrafeedback_binarized"][1], source)
    cfg = compose_run_config(["stage=dpo", "dataset=ultrafeedback_binarized", f"dataset.path={source}"])
    first = prepare(cfg, tiny_tokenizer)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("prepared data was rebuilt although nothing changed")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "_build", no_rebuild)
        again = prepare(cfg, tiny_tokenizer)
        assert again.report["fingerprint"] == first.report["fingerprint"]
        assert again.train.to_list() == first.train.to_list()
        for changed in (compose_run_config(["stage=dpo", "dataset=ultrafeedback_binarized",
                                            f"dataset.path={source}", "stage.max_length=512"]),):
            with pytest.raises(AssertionError, match="rebuilt"):
                prepare(changed, tiny_tokenizer)
        with (source / "train_prefs.jsonl").open("a") as handle:  # new content, same path
            handle.write((source / "train_prefs.jsonl").read_text().splitlines()[0] + "\n")
        with pytest.raises(AssertionError, match="rebuilt"):
            prepare(cfg, tiny_tokenizer)
    assert len(prepare(cfg, tiny_tokenizer).train) == len(first.train) + 1
