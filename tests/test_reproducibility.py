"""Every run dir says how it was made and can be made again: the command, the versions, the commit; `rerun=` repeats
a run bit for bit on CPU; the launch files run as-is under `accelerate launch`; `--cfg job` shows what will run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, run_cli

TINY_SFT = ["stage=sft", "stage.max_steps=4", "stage.packing=false", "stage.max_length=128", "learning_rate=1e-3",
            "stage.global_batch_size=8", "stage.per_device_train_batch_size=8", "stage.warmup_ratio=0",
            "dataset.eval_split=null", "stage.save_steps=1000"]


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("original")
    result = run_cli(*TINY_SFT, "run_dir=first", cwd=cwd, env={"HF_TOKEN": "hf_secretvalue12345"})
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "first"


def test_run_dir_records_command_versions_and_commit(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    command = summary["command"]
    assert command["line"] == "python -m alignment " + " ".join(TINY_SFT) + " run_dir=first"
    assert Path(command["cwd"]) == tiny_run.parent and command["config_dirs"] == []
    versions = summary["versions"]
    for package in ("alignment", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed"):
        assert versions[package], package
    import torch

    assert versions["torch"] == torch.__version__  # the build's own string (+cpu, +cu132), not only the release
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    imported = subprocess.run([sys.executable, "-c", "import alignment; print(alignment.__file__)"], cwd=tiny_run,
                              capture_output=True, text=True).stdout.strip()
    if head.returncode == 0 and Path(imported).is_relative_to(REPO):  # run from a checkout: its commit
        assert summary["project_commit"]["commit"] == head.stdout.strip()
    else:  # an installed wheel has no commit to record
        assert summary["project_commit"] is None
    assert yaml.safe_load((tiny_run / "config.yaml").read_text())["overrides"] == [*TINY_SFT, "run_dir=first"]
    assert "hf_secretvalue12345" not in "".join(p.read_text(errors="ignore") for p in tiny_run.rglob("*")
                                                 if p.is_file() and p.suffix in (".json", ".yaml", ".log", ".md"))


def test_rerun_repeats_the_run_bit_for_bit_into_a_new_dir(tiny_run, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*") if p.is_file()}
    result = run_cli(f"rerun={tiny_run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [again] = list((tmp_path / "outputs").glob("*/*"))
    assert _losses(again) == _losses(tiny_run) and len(_losses(again)) == 4  # exactly equal floats, every step
    assert yaml.safe_load((again / "config.yaml").read_text())["overrides"] == TINY_SFT  # run_dir is not carried
    assert json.loads((again / "summary.json").read_text())["command"]["line"] == f"python -m alignment rerun={tiny_run}"
    assert before == {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*") if p.is_file()}  # the original untouched


def test_rerun_takes_overrides_beside_it_and_refuses_what_it_cannot_repeat(tiny_run, tmp_path):
    result = run_cli(f"rerun={tiny_run}", "stage.max_steps=2", "dry_run=true", cwd=tmp_path)
    assert result.returncode == 0 and "max_steps=2" in result.stdout, result.stderr[-2000:]
    for args, message in (([f"rerun={tmp_path}"], "no config.yaml there"),
                          ([f"rerun={tiny_run}", f"rerun={tiny_run}"], "rerun= given more than once"),
                          (["--multirun", f"rerun={tiny_run}"], "cannot be combined with --multirun")):
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


def _yaml_documents(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def test_cfg_job_shows_what_will_run(tmp_path):
    demo = run_cli("--cfg", "job", cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr[-2000:]
    links = _yaml_documents(demo.stdout)
    assert [d["stage"]["name"] for d in links] == ["sft", "dpo"] and "# chain link 2/2: stage dpo" in demo.stdout
    single = run_cli("--cfg", "job", "stage=dpo", "beta=0.2", cwd=tmp_path)
    [dpo] = _yaml_documents(single.stdout)
    assert dpo["stage"]["name"] == "dpo" and dpo["beta"] == 0.2 and dpo["chain"] == []  # not the demo's chain
    assert run_cli("--cfg=job", "stage=dpo", "beta=0.2", cwd=tmp_path).stdout == single.stdout
    assert not (tmp_path / "outputs").exists()


def test_experiment_null_is_no_preset(tmp_path):
    null = run_cli("--cfg", "job", "experiment=null", cwd=tmp_path)
    removed = run_cli("--cfg", "job", "~experiment", cwd=tmp_path)
    assert null.returncode == removed.returncode == 0, null.stderr[-2000:]
    assert null.stdout == removed.stdout and _yaml_documents(null.stdout)[0]["experiment"] is None


DDP = ["backend=ddp", "launcher.num_processes=2", "stage=sft", "stage.max_steps=2", "stage.packing=false",
       "stage.max_length=128", "stage.global_batch_size=8", "stage.per_device_train_batch_size=4",
       "dataset.eval_split=null", "stage.save_steps=1000"]


@pytest.mark.slow
def test_launch_files_run_as_is_under_accelerate_launch(tmp_path):
    """The generated accelerate.yaml and command.sh work without the framework's parent process: accelerate launch
    with only --config_file starts both ranks; command.sh started by hand never overwrites a finished run, and
    runs as-is where its run dir is free."""
    env = {"ALIGNMENT_CACHE": str(tmp_path / "cache")}
    first = tmp_path / "first"
    result = run_cli(*DDP, f"run_dir={first}", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    launch = first / "launch"
    assert yaml.safe_load((launch / "accelerate.yaml").read_text())["num_processes"] == 2
    by_hand = tmp_path / "by_hand"
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                             str(launch / "accelerate.yaml"), "-m", "alignment", *DDP, f"run_dir={by_hand}"],
                            cwd=tmp_path, capture_output=True, text=True, env={**os.environ, **env}, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    summary = json.loads((by_hand / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["distributed"]["world_size"] == 2
    assert _losses(by_hand) == pytest.approx(_losses(first), abs=1e-6)

    finished = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    again = subprocess.run(["sh", str(launch / "command.sh")], cwd="/", capture_output=True, text=True,
                           env={**os.environ, **env}, timeout=600)
    assert again.returncode != 0 and "holds a finished run and is never overwritten" in again.stderr
    assert finished == {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}

    moved = tmp_path / "first.done"
    first.rename(moved)  # the run dir named in command.sh is free again: the script runs as it is
    result = subprocess.run([str(moved / "launch" / "command.sh")], cwd="/", capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert json.loads((first / "summary.json").read_text())["distributed"]["world_size"] == 2
    assert _losses(first) == pytest.approx(_losses(moved), abs=1e-6)
