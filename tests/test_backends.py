"""ddp, fsdp and zero3 with two real processes on gloo/CPU, started by `python -m alignment` itself.

Each run is checked for what actually ran (world size 2, the engine's distributed type, parameters really
sharded), not only for finishing: several obvious CPU setups silently train something else
(notes/distributed-on-cpu.md). Its per-step losses and its saved model are compared with a single-process
run of the same global batch and seed.

Tolerances: everything is fp32. Two processes sum the same per-example gradients in a different order
than one process accumulating two micro batches, so values differ by rounding only, about 1e-7 relative
per step. Four Adam steps at lr 1e-3 keep the drift far below 1e-5 on losses of about 0.7 and on logits of
order 1; a wrong batch split, a missed all-reduce or a rank training alone moves them by 1e-3 or more.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from .conftest import run_cli

LOSS_TOLERANCE = 1e-5
# Two processes sum gradients in another order than one: after 4 steps at lr 1e-3 the logits of the saved models
# differ by ~1e-5 (measured 1.4e-5 for DDP DPO on a loaded 2-core machine, before and after issue 15's changes).
LOGITS_TOLERANCE = 5e-5
STEPS = 4
COMMON = [f"stage.max_steps={STEPS}", "stage.max_length=256", "learning_rate=1e-3", "stage.warmup_ratio=0",
          "stage.global_batch_size=8", "stage.per_device_train_batch_size=4"]
DPO = ["stage=dpo", "stage.max_prompt_length=128", "dataset.eval_split=null", *COMMON]
SFT = ["stage=sft", "stage.packing=false", *COMMON]
# Below seed 000's persistence threshold (1M elements) the tiny twin's parameters would all stay whole;
# 0 makes ZeRO-3 partition every one of them, which is what the test must see.
PARTITION_ALL = ["backend.zero3.param_persistence_threshold=0"]
ENGINE_TYPES = {"ddp": "MULTI_CPU", "fsdp": "FSDP", "zero3": "DEEPSPEED"}


def _train(tmp_path: Path, name: str, *overrides: str) -> Path:
    """Run the command with no run_dir (as a user does) in its own directory; return the one run dir it made."""
    cwd = tmp_path / name
    cwd.mkdir()
    # A fresh cache per run: each run prepares its data and precomputes its reference log-probs itself.
    result = run_cli(*overrides, cwd=cwd, env={"ALIGNMENT_CACHE": str(cwd / "cache")})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    run_dirs = [p for p in (cwd / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, f"all ranks must share one run dir, found {run_dirs}"
    return run_dirs[0]


def _losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([[5, 17, 200, 33, 400, 9, 77, 123, 8, 300]])).logits


def _adapter_logits(adapter_dir: Path) -> torch.Tensor:
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([[5, 17, 200, 33, 400, 9, 77, 123, 8, 300]])).logits


def _assert_engine_ran(summary: dict, backend: str) -> None:
    engine = summary["distributed"]
    assert engine["world_size"] == 2 and engine["process_group"] == "gloo"
    assert engine["distributed_type"] == ENGINE_TYPES[backend], engine
    if backend == "fsdp":
        shard = engine["shards"]["model.embed_tokens.weight"] if "model.embed_tokens.weight" in engine["shards"] \
            else next(iter(engine["shards"].values()))
        assert shard["local"][0] * 2 == shard["global"][0], engine  # each rank holds half the rows
        assert engine["sharded_parameters"].split("/")[0] == engine["sharded_parameters"].split("/")[1]
    if backend == "zero3":
        assert engine["partitioned_parameters"].split("/")[0] == engine["partitioned_parameters"].split("/")[1]
        for shard in engine["shards"].values():
            numel = 1
            for size in shard["global"]:
                numel *= size
            assert shard["local_numel"] == -(-numel // 2), engine  # each rank keeps its half (rounded up)
    assert summary["batch"] == {"global": 8, "micro": 4, "accumulation": 1, "processes": 2}


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    """The single-process references: 1 process × micro batch 4 × accumulation 2 = the same global batch 8."""
    root = tmp_path_factory.mktemp("single")
    runs = {"dpo": _train(root, "dpo", *DPO), "sft": _train(root, "sft", *SFT),
            "dpo-lora": _train(root, "dpo-lora", *DPO, "peft=lora")}
    for run_dir in runs.values():
        assert _summary(run_dir)["batch"] == {"global": 8, "micro": 4, "accumulation": 2, "processes": 1}
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "fsdp", "zero3"])
@pytest.mark.parametrize("stage", ["dpo", "sft"])
def test_two_processes_match_one_process_with_the_same_global_batch(single_runs, tmp_path, backend, stage):
    extra = PARTITION_ALL if backend == "zero3" else []
    run_dir = _train(tmp_path, backend, *(DPO if stage == "dpo" else SFT), f"backend={backend}",
                     "launcher.num_processes=2", *extra)
    summary = _summary(run_dir)
    assert summary["status"] == "finished"
    _assert_engine_ran(summary, backend)
    single = single_runs[stage]
    assert len(_losses(run_dir)) == STEPS
    assert _losses(run_dir) == pytest.approx(_losses(single), abs=LOSS_TOLERANCE)
    # The saved model is whole: from_pretrained in one process gives the single-process model's logits.
    difference = (_logits(run_dir / "model") - _logits(single / "model")).abs().max().item()
    assert difference < LOGITS_TOLERANCE, difference
    # The launch is reproducible by hand: configs and the exact command are in the run dir.
    launch = run_dir / "launch"
    assert "--num_processes 2" in (launch / "command.sh").read_text()
    assert (launch / "accelerate.yaml").exists() and (launch / "deepspeed.json").exists() == (backend == "zero3")
    # Only rank 0 writes: one metrics line per step, one log.
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == STEPS + (stage == "sft")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp", "zero3"])
def test_lora_under_sharded_backends_matches_one_process(single_runs, tmp_path, backend):
    extra = PARTITION_ALL if backend == "zero3" else []
    run_dir = _train(tmp_path, backend, *DPO, "peft=lora", f"backend={backend}", "launcher.num_processes=2", *extra)
    summary = _summary(run_dir)
    assert summary["distributed"]["distributed_type"] == ENGINE_TYPES[backend]
    assert summary["distributed"]["world_size"] == 2
    assert (run_dir / "model" / "adapter_config.json").exists(), "a LoRA run saves its adapter"
    single = single_runs["dpo-lora"]
    assert _losses(run_dir) == pytest.approx(_losses(single), abs=LOSS_TOLERANCE)
    difference = (_adapter_logits(run_dir / "model") - _adapter_logits(single / "model")).abs().max().item()
    assert difference < LOGITS_TOLERANCE, difference


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["fsdp", "zero3"])
def test_qlora_under_sharded_backends_on_gpu(tmp_path, backend):
    """4-bit bases shard only when their storage dtype is the compute dtype (peft.quant_storage=bfloat16)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    run_dir = _train(tmp_path, backend, *DPO, "peft=qlora", f"backend={backend}", "launcher.num_processes=2")
    summary = _summary(run_dir)
    assert summary["status"] == "finished" and summary["distributed"]["world_size"] == 2
    assert (run_dir / "model" / "adapter_config.json").exists()
    assert os.path.getsize(run_dir / "model" / "adapter_model.safetensors") > 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp", "zero3"])
def test_sharded_checkpoints_resume_to_the_same_result(tmp_path, backend):
    """A 2-process run that died after its last step resumes from its sharded checkpoint and ends the same."""
    extra = PARTITION_ALL if backend == "zero3" else []
    run_dir = _train(tmp_path, backend, *DPO, "stage.save_steps=2", f"backend={backend}", "launcher.num_processes=2",
                     *extra)
    finished = _summary(run_dir)
    sharded = {"fsdp": "pytorch_model_fsdp_0", "zero3": "global_step2"}[backend]
    assert (run_dir / "checkpoints" / "checkpoint-2" / sharded).is_dir(), "checkpoints hold one shard per rank"
    (run_dir / "summary.json").write_text(json.dumps({**finished, "status": "failed"}))
    result = run_cli(*DPO, "stage.save_steps=2", f"backend={backend}", "launcher.num_processes=2", *extra,
                     f"run_dir={run_dir}", "resume=true", cwd=tmp_path / backend,
                     env={"ALIGNMENT_CACHE": str(tmp_path / backend / "cache")})
    assert result.returncode == 0, result.stderr[-4000:]
    resumed = _summary(run_dir)
    assert resumed["status"] == "finished" and resumed["resumed_from"].endswith("checkpoint-2")
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1)), "each step logged once across the two launches"
    assert resumed["final_metrics"]["loss"] == pytest.approx(finished["final_metrics"]["loss"], abs=LOSS_TOLERANCE)
