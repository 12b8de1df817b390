"""Bring your own model and config: checkpoints named by model.name_or_path, bad sources refused before anything is
written, user config dirs seen by every command, and saved runs that load from any directory."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

EXAMPLE_CONFIG = REPO / "examples" / "my_config"


@pytest.fixture(scope="session")
def twin_checkpoint(tmp_path_factory) -> Path:
    """The tiny Qwen2 twin copied to an ordinary checkpoint dir of the user's (config.json, weights, tokenizer)."""
    from alignment.preflight.compose import compose_run_config
    from alignment.models.start import resolve_start

    target = tmp_path_factory.mktemp("user-models") / "my-qwen"
    shutil.copytree(resolve_start(compose_run_config([])).weights, target)
    return target


def _bad_sources(root: Path, twin: Path) -> dict[str, tuple[list[str], str]]:
    from transformers import BertConfig

    (root / "empty").mkdir()
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(twin)}))
    bert = root / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               architectures=["BertForMaskedLM"]).save_pretrained(bert)
    (root / "broken.gguf").write_bytes(b"GGUF" + os.urandom(256))
    return {
        "missing path": ([f"model.name_or_path={root / 'nowhere'}"], "does not exist"),
        "not a model dir": ([f"model.name_or_path={root / 'empty'}"], "is not a model dir: it has no config.json"),
        "adapter dir": ([f"model.name_or_path={adapter}"], "is a LoRA adapter"),
        "not a causal LM": ([f"model.name_or_path={bert}"],
                            "holds a bert model (architectures: BertForMaskedLM), which transformers cannot load as "
                            "a causal language model"),
        "gguf missing": ([f"model.name_or_path={root / 'none.gguf'}"], "no such GGUF file"),
        "gguf unreadable": ([f"model.name_or_path={root / 'broken.gguf'}"], "transformers cannot read this GGUF file"),
        "gguf file and gguf_file": ([f"model.name_or_path={root / 'broken.gguf'}", "model.gguf_file=x.gguf"],
                                    "give one"),
        "preset disagrees": (["model=mistral7b", f"model.name_or_path={twin}"],
                             "model=mistral7b does not describe"),
        "stated fact disagrees": (["model=tiny_qwen2", "model.tiny=false", f"model.name_or_path={twin}",
                                   "model.architecture.hidden_size=128"],
                                  "hidden_size: 128 in the preset, 64 in its config"),
    }


BAD_SOURCE_IDS = ["missing path", "not a model dir", "adapter dir", "not a causal LM", "gguf missing",
                  "gguf unreadable", "gguf file and gguf_file", "preset disagrees", "stated fact disagrees"]


@pytest.mark.parametrize("case", BAD_SOURCE_IDS)
@pytest.mark.parametrize("dry_run", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_bad_model_source_exits_2_before_anything_is_written(tmp_path, twin_checkpoint, case, dry_run):
    models = tmp_path / "models"
    models.mkdir()
    args, message = _bad_sources(models, twin_checkpoint)[case]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    result = run_cli("stage=sft", *args, *(["dry_run=true"] if dry_run else []), cwd=cwd)
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    assert message.lower() in result.stderr.lower(), result.stderr
    assert result.stderr.count("alignment: error:") == 1 and "Traceback" not in result.stderr
    assert not (cwd / "outputs").exists(), "nothing may be written for bad input"


@pytest.mark.slow  # a CLI dry run (~5 s); the fast tier keeps one of each kind
def test_any_preset_given_a_checkpoint_plans_that_checkpoint_never_the_twin(tmp_path, twin_checkpoint):
    """tiny_mistral is a twin preset: given the user's Qwen2 checkpoint, the dry run plans the checkpoint."""
    result = run_cli("model=tiny_mistral", f"model.name_or_path={twin_checkpoint}", "stage=sft", "dry_run=true",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model        my-qwen: 217,664 parameters" in result.stdout
    assert f"starts from  {twin_checkpoint}" in result.stdout and "tiny twin" not in result.stdout
    assert re.search(r"model_type: qwen2\n", result.stdout) and "tiny: false" in result.stdout
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_twin_preset_given_a_checkpoint_trains_that_checkpoint(tmp_path, twin_checkpoint):
    from alignment.records.rundir import read_summary

    result = run_cli("model=tiny_mistral", f"model.name_or_path={twin_checkpoint}", "stage=sft", "stage.max_steps=2",
                     "stage.max_length=128", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = read_summary(tmp_path / "run")
    assert summary["lineage"]["weights"] == str(twin_checkpoint) == summary["start_model"]
    assert summary["lineage"]["base_model"] == str(twin_checkpoint)


@pytest.mark.slow  # a CLI dry run (~5 s); the fast tier keeps one of each kind
def test_user_config_dir_dry_run_uses_its_model_dataset_and_experiment(tmp_path):
    result = run_cli("-cd", str(EXAMPLE_CONFIG), "experiment=my_dpo", "dry_run=true", cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model        my_llama:" in result.stdout
    assert "dataset      my_prefs (ultrafeedback)" in result.stdout and "beta=0.2" in result.stdout
    assert "model_type: llama" in result.stdout


def test_an_option_missing_from_every_config_dir_is_refused_with_the_user_options(tmp_path):
    result = run_cli("-cd", str(EXAMPLE_CONFIG), "model=my_lama", "dry_run=true", cwd=tmp_path)
    assert result.returncode == 2
    assert "model=my_lama is not an option of config group 'model'" in result.stderr
    assert "my_llama" in result.stderr and "tiny_qwen2" in result.stderr


@pytest.mark.slow
def test_user_config_dir_run_and_sweep_use_its_files(tmp_path):
    from alignment.records.rundir import read_summary

    run = run_cli("-cd", str(EXAMPLE_CONFIG), "experiment=my_dpo", f"run_dir={tmp_path / 'run'}", cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "name: my_llama" in config and "name: my_prefs" in config and "beta: 0.2" in config
    assert read_summary(tmp_path / "run")["status"] == "finished"

    # The hydra.searchpath form, in a --multirun of two members, from another directory (dataset path absolute).
    sweep = run_cli("--multirun", f"hydra.searchpath=[file://{EXAMPLE_CONFIG}]", "experiment=my_dpo",
                    f"dataset.path={REPO / 'tests/fixtures/ultrafeedback_binarized'}", "beta=0.1,0.3", cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    members = sorted((tmp_path / "outputs" / "sweeps").glob("*/[0-9]"))
    assert len(members) == 2
    for member, beta in zip(members, ("0.1", "0.3")):
        config = (member / "config.yaml").read_text()
        assert "name: my_llama" in config and "name: my_prefs" in config and f"beta: {beta}" in config
        assert read_summary(member)["status"] == "finished"


@pytest.mark.slow
def test_an_adapter_on_a_relative_parent_records_an_absolute_base_and_loads_anywhere(tmp_path):
    import torch
    from peft import AutoPeftModelForCausalLM

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    sft = run_cli("stage=sft", "stage.max_steps=2", "stage.max_length=128", "run_dir=runs/sft", cwd=work)
    assert sft.returncode == 0, sft.stderr[-2000:]
    dpo = run_cli("stage=dpo", "peft=lora", "parent_run=runs/sft", "run_dir=runs/dpo", "stage.max_steps=2",
                  "stage.max_length=128", "stage.max_prompt_length=64", "stage.eval_steps=null", cwd=work)
    assert dpo.returncode == 0, dpo.stderr[-2000:]
    model_dir = work / "runs" / "dpo" / "model"
    base = json.loads((model_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(work / "runs" / "sft" / "model")
    card = (model_dir / "README.md").read_text()
    assert f"- sits on: `{base}`" in card and "- original base model: `" in card and "base_model_relation" not in card
    assert not (work / "runs" / "dpo" / "checkpoints" / "README.md").exists(), "TRL's draft card is not written"

    ids = torch.tensor([[3, 17, 42, 99, 5]])
    cwd = Path.cwd()
    logits = []
    for directory in (work, elsewhere):
        os.chdir(directory)
        try:
            model = AutoPeftModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
            with torch.no_grad():
                logits.append(model(input_ids=ids).logits)
        finally:
            os.chdir(cwd)
    assert torch.equal(logits[0], logits[1])


def _hub_cache_with(checkpoint: Path, root: Path, repo_id: str) -> Path:
    """A Hugging Face hub cache holding `checkpoint` as repo_id, laid out as huggingface_hub writes it."""
    commit = "0" * 40
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for index, source in enumerate(sorted(p for p in checkpoint.iterdir() if p.is_file())):
        blob = repo / "blobs" / f"{index:040d}"
        shutil.copyfile(source, blob)
        (snapshot / source.name).symlink_to(os.path.relpath(blob, snapshot))
    return root


@pytest.mark.slow
def test_an_offline_hub_id_in_the_local_cache_is_planned_and_trained(tmp_path, twin_checkpoint):
    """Offline, a hub id in the HF cache is read from there: facts at composition, weights at load; the card's
    base_model is the hub id, the relation finetune."""
    cache = _hub_cache_with(twin_checkpoint, tmp_path / "hub", "someone/my-qwen")
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    dry = run_cli("stage=sft", "model.name_or_path=someone/my-qwen", "dry_run=true", cwd=tmp_path, env=env)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "model        my-qwen: 217,664 parameters" in dry.stdout and "(hub id: the local HF cache, offline)" in dry.stdout
    run = run_cli("stage=sft", "model.name_or_path=someone/my-qwen", "stage.max_steps=2", "stage.max_length=128",
                  f"run_dir={tmp_path / 'run'}", cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "base_model: someone/my-qwen" in card and "base_model_relation: finetune" in card
    missing = run_cli("stage=sft", "model.name_or_path=someone/not-cached", "dry_run=true", cwd=tmp_path, env=env)
    assert missing.returncode == 2 and "is a hub id that is not in the local Hugging Face cache" in missing.stderr
