"""The seeds' experiments as presets: each composes, validates and dry-runs offline, and runs shrunk on a tiny twin."""

from __future__ import annotations

import json

import pytest

from alignment.preflight.compose import compose_run_config, group_options
from alignment.preflight.validation import validate

from .conftest import run_cli

PRESETS = ["zephyr_dsft_paper", "zephyr_dsft_handbook", "zephyr_ddpo_paper", "zephyr_ddpo_handbook", "qwen72b_qlora_dpo",
           "zephyr", "zephyr_handbook"]
# Shrinking: a tiny twin of the same family, the tiny fixture in the same schema, one CPU process, a few steps.
SHRINK = ["stage.max_steps=2", "stage.max_length=256", "stage.global_batch_size=8", "stage.per_device_train_batch_size=4",
          "stage.per_device_eval_batch_size=4", "backend=single", "launcher.num_processes=1", "stage.eval_steps=null",
          "stage.save_steps=100", "eval.generation.num_prompts=4", "eval.generation.max_new_tokens=8",
          "dataset.num_proc=1", "model.dtype=float32", "model.attn_implementation=sdpa"]


def test_every_preset_is_in_the_experiment_group():
    assert set(PRESETS) <= set(group_options("experiment"))


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_and_validates(preset, planning):
    validate(compose_run_config([f"experiment={preset}", "dry_run=true"]))


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_dry_runs_without_downloads(preset, tmp_path, planning):
    """Planning a hub model's run needs nothing downloaded (composition reads only the local cache); a dry run is
    checked as its run, so it is planned as a run that may download (HF_HUB_OFFLINE unset), as on a login node."""
    result = run_cli(f"experiment={preset}", "dry_run=true", cwd=tmp_path, env=planning)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "memory plan per device" in result.stdout and "dry run: nothing was loaded" in result.stdout


@pytest.mark.slow
def test_a_hub_preset_is_refused_offline_by_its_dry_run_as_by_its_run(tmp_path):
    for dry in ("dry_run=true", "dry_run=false"):
        result = run_cli("experiment=zephyr_dsft_paper", dry, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
        assert result.returncode == 2 and "is a hub id, the run is offline" in result.stderr, result.stderr[-2000:]


def test_qwen72b_preset_dry_run_reports_seed_000_settings(tmp_path, planning):
    result = run_cli("experiment=qwen72b_qlora_dpo", "dry_run=true", cwd=tmp_path, env=planning)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for expected in ("global batch 32 = micro batch 1 × accumulation 16 × 2 processes", "max_length=512", "beta=0.1",
                     "lr=1e-05", "max_steps=10", "peft         qlora", "backend      fsdp on 2 processes",
                     "quant_storage: bfloat16", "quant_type: nf4", "test_size: 0.01", "pad_token: <|image_pad|>",
                     "verdict: fits"):
        assert expected in out, expected


@pytest.mark.slow
def test_every_preset_trains_shrunk_on_a_tiny_twin(tmp_path):
    """Same presets, same code path; model, data and size swapped by override. The `zephyr` chain is its two
    links run in turn here (dsft, then ddpo from it): one command-line dataset cannot serve both links."""
    sft = tmp_path / "dsft"
    result = run_cli("experiment=zephyr_dsft_paper", "model=tiny_mistral", "dataset=tiny_sft", *SHRINK, f"run_dir={sft}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {"zephyr_dsft_paper": sft}
    for preset in ("zephyr_ddpo_paper", "zephyr_ddpo_handbook"):
        runs[preset] = tmp_path / preset
        result = run_cli(f"experiment={preset}", "model=tiny_mistral", "dataset=tiny_dpo", *SHRINK,
                         "stage.max_prompt_length=128", f"parent_run={sft}", f"run_dir={runs[preset]}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    runs["qwen72b_qlora_dpo"] = tmp_path / "qwen"
    result = run_cli("experiment=qwen72b_qlora_dpo", "model=tiny_qwen2", "dataset=tiny_dpo", *SHRINK,
                     "stage.max_prompt_length=128", "peft.compute_dtype=float32", "peft.quant_storage=float32",
                     "model.dtype=float32", f"run_dir={runs['qwen72b_qlora_dpo']}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for preset, run_dir in runs.items():
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "finished", preset
    # The paper preset evaluates after training (ours, said so in recipes/sources.yaml); the handbook's does not.
    evaluation = json.loads((runs["zephyr_ddpo_paper"] / "summary.json").read_text())["evaluation"]
    assert evaluation["status"] == "finished" and evaluation["preference_accuracy_before"] == 0.5
    assert "evaluation" not in json.loads((runs["zephyr_ddpo_handbook"] / "summary.json").read_text())
    config = (runs["zephyr_ddpo_handbook"] / "config.yaml").read_text()
    assert "beta: 0.01" in config and "experiment: zephyr_ddpo_handbook" in config


@pytest.mark.slow
def test_model_card_names_the_base_the_parent_run_and_the_data(demo_run):
    card = (demo_run["dir"] / "2-dpo" / "model" / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    import yaml

    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and "dpo" in meta["tags"]
    assert "datasets" not in meta and "base_model" not in meta  # local paths are not hub ids: not in the metadata
    summary = json.loads((demo_run["dir"] / "2-dpo" / "summary.json").read_text())
    results = {r["metrics"][0]["name"]: r["metrics"][0]["value"] for r in meta["model-index"][0]["results"]}
    assert results["held-out preference accuracy (implicit reward)"] == round(
        summary["evaluation"]["preference_accuracy_after"], 4)
    assert f"- fine-tuned from: `{(demo_run['dir'] / '1-sft' / 'model').resolve()}`" in body
    assert f"parent run: `{(demo_run['dir'] / '1-sft').resolve()}` (sft, saved full model)" in body
    assert "| tiny_ultrafeedback |" in body and "| train_prefs | train | 512 |" in body
    assert "| beta | 0.5 |" in body and "global batch | 64 = 32 × 2 × 1 processes" in body
    assert f"| rewards/margins | {summary['final_metrics']['rewards/margins']:.4f} |" in body
