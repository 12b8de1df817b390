"""dry_run=true: the plan for any model, offline, with no weights loaded and nothing written."""

from __future__ import annotations

import pytest

from .conftest import run_cli


@pytest.mark.parametrize("model, params, gate", [
    ("qwen72b", "72,706,203,648", "would refuse it"),
    # 7B fully fine-tuned in bf16 with checkpointing and precomputed reference log-probs: 69.6 GB (+10%: 76.6 GB).
    pytest.param("mistral7b", "7,241,732,096", "admits it", marks=pytest.mark.slow)])
def test_dry_run_of_big_models_needs_no_download(tmp_path, model, params, gate, planning):
    """Planned as a run that would download (this machine has no route to the hub: a download attempt would fail)."""
    result = run_cli(f"model={model}", "stage=dpo", "dry_run=true", cwd=tmp_path, env=planning)
    assert result.returncode == 0, result.stderr[-3000:]
    assert params in result.stdout and "trl.DPOTrainer" in result.stdout
    assert "nothing was loaded or written" in result.stdout
    assert not (tmp_path / "outputs").exists()
    # Both presets train with checkpointing (their sources do). Every weight of the 72B does not fit one 80 GB GPU,
    # so that run would be refused by the memory gate, which the dry run says without refusing; the 7B fits.
    assert "checkpointing on (model.gradient_checkpointing=true)" in result.stdout
    assert f"memory gate  {gate}: " in result.stdout and "(launcher.gpu_memory_gb=80)" in result.stdout


def test_dry_run_of_the_demo_shows_both_stages(tmp_path):
    result = run_cli("dry_run=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage 1/2: sft" in result.stdout and "stage 2/2: dpo" in result.stdout
    assert "1-sft" in result.stdout and "2-dpo" in result.stdout
