"""Bad input: exit code 2, one message naming the key and what to do, nothing trained or written."""

from __future__ import annotations

import pytest

from .conftest import run_cli

CASES = {
    "unknown group option": (["model=gpt5"], "Valid options: mistral7b, qwen72b, tiny_mistral, tiny_qwen2"),
    "mandatory value missing": (["model.name_or_path=???"], "model.name_or_path is mandatory"),
    "beta zero": (["stage=dpo", "beta=0"], "beta must be > 0"),
    "beta negative": (["beta=-0.1"], "beta must be > 0"),
    "learning rate zero": (["stage=sft", "learning_rate=0"], "learning_rate must be > 0"),
    "dpo on chat data": (["stage=dpo", "dataset=tiny_sft"], "stage=dpo trains on preference data"),
    "hub model offline": (["model=mistral7b", "stage=sft", "offline=true"], "use model=tiny_qwen2"),
    "missing local model": (["stage=sft", "model=tiny_qwen2", "model.tiny=false", "model.name_or_path=./nowhere"],
                            "model.name_or_path=./nowhere does not exist locally"),
    "misspelt key": (["betta=0.1"], "Did you mean beta?"),
    "wrong type": (["learning_rate=fast"], "learning_rate"),
    "mix fraction out of range": (["stage=dpo", "dataset.mix=[{name: b, schema: orpo, path: x.jsonl, fraction: 1.5}]"],
                                  "dataset.mix[0].fraction must be in (0, 1]"),
    "prompt budget over max_length": (["stage=dpo", "stage.max_length=256"],
                                      "stage.max_prompt_length must be null or in [1, stage.max_length)"),
    "hub dataset offline": (["stage=dpo", "dataset=ultrafeedback_binarized", "offline=true"],
                            "--local-dir data/ultrafeedback_binarized"),
    "bad sweep member": (["--multirun", "beta=0.1,-1"], "sweep member [beta=-1]: beta must be > 0"),
}


@pytest.mark.parametrize("args, message", CASES.values(), ids=CASES.keys())
def test_bad_input_exits_2_with_a_clear_message(tmp_path, args, message):
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    assert message.lower() in result.stderr.lower()
    assert result.stderr.count("alignment: error:") == 1
    assert not (tmp_path / "outputs").exists(), "nothing may be written for bad input"


def test_finished_run_dir_is_never_overwritten(demo_run, tmp_path):
    chain_dir = demo_run["dir"]
    before = {p: p.stat().st_mtime_ns for p in chain_dir.rglob("*") if p.is_file()}
    for args in ([f"run_dir={chain_dir}"], ["stage=sft", f"run_dir={chain_dir / '1-sft'}"]):
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 2
        assert "holds a finished run" in result.stderr and "never overwritten" in result.stderr
    assert before == {p: p.stat().st_mtime_ns for p in chain_dir.rglob("*") if p.is_file()}


def test_resume_of_a_finished_run_is_refused(demo_run, tmp_path):
    result = run_cli("stage=sft", f"run_dir={demo_run['dir'] / '1-sft'}", "resume=true", cwd=tmp_path)
    assert result.returncode == 2 and "finished" in result.stderr
