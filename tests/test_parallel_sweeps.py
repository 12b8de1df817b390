"""hydra/launcher=parallel: sweep members side by side, each its own process, sharing the caches' work."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from alignment.errors import ConfigError
from alignment.sweep.slots import MemberNeeds, ParallelSettings, check_member, plan_slots

from .conftest import run_cli
from .test_sweeps import _one_sweep_dir

# Few steps at a learning rate that moves the loss, so that equal losses mean something.
SHORT = ["stage=dpo", "ref=precomputed", "learning_rate=1e-3", "stage.max_steps=4", "stage.warmup_ratio=0",
         "stage.max_length=256", "stage.max_prompt_length=128", "stage.global_batch_size=8",
         "stage.per_device_train_batch_size=8", "dataset.eval_split=null"]
PARALLEL = ["hydra/launcher=parallel", "hydra.launcher.members_in_parallel=2", "hydra.launcher.threads_per_member=1"]


def _sweep(cwd: Path, betas: str, *extra: str, cache: Path, env: dict | None = None):
    # A cache of its own: what the members build is counted from an empty one.
    return run_cli("--multirun", *SHORT, f"beta={betas}", *extra, cwd=cwd,
                   env={"ALIGNMENT_CACHE": str(cache), **(env or {})})


def _losses(member: Path) -> list[float]:
    records = [json.loads(line) for line in (member / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r and "step" in r]


def _summary(member: Path) -> dict:
    return json.loads((member / "summary.json").read_text())


def test_settings_this_machine_cannot_honour_are_refused_before_anything_starts(tmp_path):
    # GPUs asked of a machine that shows none: one line, exit 2, no sweep dir.
    result = run_cli("--multirun", "hydra/launcher=parallel", "hydra.launcher.devices_per_member=2", "stage=dpo",
                     "beta=0.05,0.1", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "devices_per_member=2 but no GPU is visible" in lines[0], lines
    assert not (tmp_path / "outputs").exists()
    # The same checks against a machine with 4 GPUs (the device list is what CUDA_VISIBLE_DEVICES would show).
    gpus = ["0", "1", "2", "3"]
    with pytest.raises(ConfigError, match=r"members_in_parallel=3 x devices_per_member=2 needs 6 GPUs"):
        plan_slots(ParallelSettings(members_in_parallel=3, devices_per_member=2), gpus, 16)
    slots = plan_slots(ParallelSettings(devices_per_member=2), gpus, 16)
    assert [s.environment()["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0,1", "2,3"]
    needs = MemberNeeds("sweep member 1 (beta=0.1)", "ddp", "auto", 4, 1, None)
    with pytest.raises(ConfigError, match=r"launcher.num_processes=4 but each member sees 2 GPU"):
        check_member(needs, slots)
    with pytest.raises(ConfigError, match=r"at least 1"):
        ParallelSettings(members_in_parallel=0)
    # On CPU: two members at once on two cores get one thread each.
    assert [s.environment()["OMP_NUM_THREADS"] for s in plan_slots(ParallelSettings(), [], 2)] == ["1", "1"]


@pytest.mark.slow
def test_members_side_by_side_compute_the_reference_once_and_train_as_the_basic_launcher_does(tmp_path):
    (tmp_path / "parallel").mkdir()
    parallel = _sweep(tmp_path / "parallel", "0.05,0.1", *PARALLEL, cache=tmp_path / "cache-parallel")
    assert parallel.returncode == 0, parallel.stderr[-4000:]
    sweep = _one_sweep_dir(tmp_path / "parallel")
    members = [sweep / "0", sweep / "1"]
    summaries = [_summary(m) for m in members]
    assert [s["status"] for s in summaries] == ["finished", "finished"]
    # They ran at the same time: each started before the other ended.
    assert summaries[0]["started_at"] <= summaries[1]["ended_at"] and summaries[1]["started_at"] <= summaries[0]["ended_at"]
    # One reference pass for the sweep: one member computed the log-probs, the other waited and reused them.
    references = sorted((s["reference"]["reused"], s["reference"]["forward_batches"]) for s in summaries)
    assert references[0][0] is False and references[0][1] > 0 and references[1] == (True, 0), references
    builds = [json.loads(line) for line in (tmp_path / "cache-parallel" / "builds.jsonl").read_text().splitlines()]
    reference_builders = {b["pid"] for b in builds if b["kind"] == "reference log-probs"}
    assert len(reference_builders) == 1, builds
    for kind in ("tiny twin", "prepared data"):
        assert sum(b["kind"] == kind for b in builds) == 1, builds
    # Every relayed line names its member.
    for number, beta in (("0", "0.05"), ("1", "0.1")):
        steps = [line for line in parallel.stdout.splitlines() if "step 4/4" in line and f"beta={beta}]" in line]
        assert len(steps) == 1 and steps[0].startswith(f"[member {number} beta={beta}] "), parallel.stdout[-3000:]
    assert "sweep: 2 members, all finished" in parallel.stdout

    # The same members, one after another in one process (the basic launcher), from an empty cache of their own.
    # One thread, as each parallel member had: the comparison is of the launchers, not of thread counts.
    (tmp_path / "basic").mkdir()
    basic = _sweep(tmp_path / "basic", "0.05,0.1", cache=tmp_path / "cache-basic", env={"OMP_NUM_THREADS": "1"})
    assert basic.returncode == 0, basic.stderr[-4000:]
    basic_sweep = _one_sweep_dir(tmp_path / "basic")
    assert basic_sweep.name == sweep.name, "the launcher is not part of the sweep's name: either one resumes it"
    for member in ("0", "1"):
        # Whichever member computed the reference log-probs (here: the one that took the cache lock first; there:
        # member 0), each trains on the same numbers: computing them must not move the training RNG.
        assert _losses(sweep / member) == _losses(basic_sweep / member), (member, references)
        assert len(_losses(sweep / member)) == 4
    assert _losses(sweep / "0") != _losses(sweep / "1"), "beta changes the run: the comparison is not vacuous"


@pytest.mark.slow
def test_a_member_that_crashes_leaves_the_other_finishing_and_the_sweep_fails(tmp_path):
    # beta=1e38 passes every check but overflows the DPO logits at the first step: that member fails after start.
    first = _sweep(tmp_path, "0.1,1e38", *PARALLEL, "stage.max_steps=3", cache=tmp_path / "cache")
    assert first.returncode == 1, "the exit code says not every member succeeded"
    sweep = _one_sweep_dir(tmp_path)
    statuses = {r["member"]: r["status"] for r in csv.DictReader((sweep / "sweep_summary.csv").open())}
    assert statuses == {"0": "finished", "1": "failed"}
    assert "NonFiniteTraining" in _summary(sweep / "1")["error"]
    betas = [[o for o in _summary(sweep / m)["sweep"]["overrides"] if o.startswith("beta=")] for m in ("0", "1")]
    assert betas[0] == ["beta=0.1"] and float(betas[1][0].split("=")[1]) == 1e38, betas
    # The failure is reported on the console under the failing member's name (the sweeper writes 1e38 its own way).
    assert any(line.startswith(f"[member 1 {betas[1][0]}] ") and "failed" in line
               for line in first.stdout.splitlines()), first.stdout[-3000:]

    # The same command again: the finished member is skipped (no process started for it), the failed one reruns.
    untouched = (sweep / "0" / "metrics.jsonl").stat().st_mtime_ns
    again = _sweep(tmp_path, "0.1,1e38", *PARALLEL, "stage.max_steps=3", cache=tmp_path / "cache")
    assert again.returncode == 1
    assert _one_sweep_dir(tmp_path) == sweep
    assert "sweep member 0 (stage=dpo" in again.stdout + again.stderr and "already finished" in again.stdout + again.stderr
    assert "[member 0 beta=0.1]" not in again.stdout + again.stderr
    assert (sweep / "0" / "metrics.jsonl").stat().st_mtime_ns == untouched
