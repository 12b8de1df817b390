"""Beta sweeps: one dir per command, a summary that equals the members' own, failures contained, reruns resume."""

from __future__ import annotations

import csv
import json
import os

import pytest
import yaml

from .conftest import run_cli

pytestmark = pytest.mark.slow

TOKEN = "hf_sweepSECRETvalue1234567890"


def _sweep(tmp_path, parent, betas: str, *extra: str, env: dict | None = None):
    return run_cli("--multirun", "stage=dpo", f"beta={betas}", f"parent_run={parent}", "learning_rate=3e-4",
                   "stage.max_steps=20", "stage.warmup_ratio=0", "stage.max_length=256", "stage.max_prompt_length=128",
                   "stage.global_batch_size=32", "stage.per_device_train_batch_size=32", "dataset.eval_split=null",
                   *extra, cwd=tmp_path, env=env)


def _one_sweep_dir(tmp_path):
    sweeps = [p for p in (tmp_path / "outputs" / "sweeps").iterdir() if p.is_dir()]
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


def test_beta_sweep_summary_equals_each_members_own_and_compares_margins(demo_run, tmp_path):
    env = {"HF_TOKEN": TOKEN, "WANDB_API_KEY": TOKEN[::-1]}
    result = _sweep(tmp_path, demo_run["dir"] / "1-sft", "0.1,0.5,2.0", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = _one_sweep_dir(tmp_path)
    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert [r["beta"] for r in rows] == ["0.1", "0.5", "2.0"] and {r["status"] for r in rows} == {"finished"}
    for row in rows:
        own = json.loads((sweep / row["member"] / "summary.json").read_text())["final_metrics"]
        for key in ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"):
            assert float(row[key]) == pytest.approx(own[key], rel=1e-12)
    assert (sweep / "sweep_summary.md").read_text().startswith("| member | beta | status |")
    assert (sweep / "sweep_comparison.png").stat().st_size > 10_000
    margins = [float(r["rewards/margins"]) for r in rows]
    assert margins[0] < margins[1] < margins[2], margins  # the reward is beta × log-ratio: larger beta, larger margin
    # Shared work: the reference log-probs are computed by the first member only.
    reused = [json.loads((sweep / r["member"] / "summary.json").read_text())["reference"]["reused"] for r in rows]
    assert reused[1:] == [True, True]
    leaked = [p for p in sweep.rglob("*") if p.is_file() and p.suffix != ".png"
              and (TOKEN.encode() in p.read_bytes() or TOKEN[::-1].encode() in p.read_bytes())]
    assert leaked == []


def test_a_failing_member_does_not_stop_the_sweep_and_a_rerun_finishes_only_the_unfinished(demo_run, tmp_path):
    parent = demo_run["dir"] / "1-sft"
    # beta=1e38 overflows the DPO logits: its first step is non-finite and the member fails.
    first = _sweep(tmp_path, parent, "0.1,1e38,0.5", "stage.max_steps=4")
    assert first.returncode == 1, "the exit code says not every member succeeded"
    sweep = _one_sweep_dir(tmp_path)
    statuses = {r["member"]: r["status"] for r in csv.DictReader((sweep / "sweep_summary.csv").open())}
    assert statuses == {"0": "finished", "1": "failed", "2": "finished"}
    failed = json.loads((sweep / "1" / "summary.json").read_text())
    assert "NonFiniteTraining" in failed["error"]

    # Member 2 is made unfinished (as if its machine died); member 0 stays finished.
    summary_2 = json.loads((sweep / "2" / "summary.json").read_text())
    (sweep / "2" / "summary.json").write_text(json.dumps({**summary_2, "status": "interrupted"}))
    untouched = (sweep / "0" / "metrics.jsonl").stat().st_mtime_ns
    again = _sweep(tmp_path, parent, "0.1,1e38,0.5", "stage.max_steps=4")
    assert again.returncode == 1
    assert _one_sweep_dir(tmp_path) == sweep, "the same command finds the same sweep dir"
    assert "already finished" in again.stderr + again.stdout
    assert (sweep / "0" / "metrics.jsonl").stat().st_mtime_ns == untouched
    statuses = {r["member"]: r["status"] for r in csv.DictReader((sweep / "sweep_summary.csv").open())}
    assert statuses == {"0": "finished", "1": "failed", "2": "finished"}
    steps = [json.loads(line)["step"] for line in (sweep / "2" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], "the resumed member logs each step once"
    assert os.path.exists(sweep / "2" / "model" / "config.json")


def test_each_multi_process_member_gets_its_own_launch(demo_run, tmp_path):
    """Members run one after another, each launching its own 2 ranks: never two members in one process group."""
    result = _sweep(tmp_path, demo_run["dir"] / "1-sft", "0.1,0.5", "stage.max_steps=2", "backend=ddp",
                    "launcher.num_processes=2", "stage.per_device_train_batch_size=16")
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = _one_sweep_dir(tmp_path)
    for member in ("0", "1"):
        summary = json.loads((sweep / member / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["distributed"]["world_size"] == 2
        command = (sweep / member / "launch" / "command.sh").read_text()
        assert str(sweep / member) in command and "beta=" in command
    assert result.stdout.count("alignment: launching 2 processes") == 2


def test_optuna_searches_beta_maximising_the_named_metric(demo_run, tmp_path):
    result = run_cli("--multirun", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.direction=maximize",
                     "hydra.sweeper.sampler.seed=0", "beta=interval(0.05,2.0)", "objective=rewards/margins",
                     "stage=dpo", f"parent_run={demo_run['dir'] / '1-sft'}", "learning_rate=3e-4", "stage.max_steps=6",
                     "stage.max_length=256", "stage.max_prompt_length=128", "stage.global_batch_size=32",
                     "stage.per_device_train_batch_size=32", "dataset.eval_split=null", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = _one_sweep_dir(tmp_path)
    rows = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert len(rows) == 3 and {r["status"] for r in rows} == {"finished"}
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    margins = {float(r["beta"]): float(r["rewards/margins"]) for r in rows}
    assert best["best_value"] == pytest.approx(max(margins.values()))
    assert margins[best["best_params"]["beta"]] == pytest.approx(best["best_value"])
