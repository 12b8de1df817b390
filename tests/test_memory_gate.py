"""The memory gate and gradient_checkpointing=auto: a run that does not fit the memory free where it runs is refused
(exit 2) before any weight loads or any rank starts, or warned about with launcher.memory_gate=warn; auto turns
checkpointing on only when the run does not fit without it.

The free memory is shrunk with ALIGNMENT_MEMORY_CAPACITY_GB (alignment/plan/capacity.py), which replaces the
measurement: nothing of the trainer is mocked.
"""

from __future__ import annotations

import json

import pytest

from alignment.config.schema import as_dict
from alignment.errors import ConfigError
from alignment.plan.capacity import CAPACITY_ENV, Capacity, measured_capacity
from alignment.plan.dryrun import describe
from alignment.plan.gate import MEMORY_MARGIN, admits, run_plan
from alignment.plan.memory import GB, plan_inputs, plan_memory
from alignment.plan.resolved import ResolvedPlan, plan_of
from alignment.preflight.compose import compose_run_config
from alignment.preflight.validation import validate

from .conftest import SHORT_DPO, run_cli, train

# What the design doc's command plans: Qwen2.5-72B, every weight trained, FSDP.
QWEN72B_FULL = ["stage=dpo", "model=qwen72b", "backend=fsdp"]
TWO_PROCESSES = ["backend=ddp", "launcher.num_processes=2", "stage.global_batch_size=16"]
UNLIMITED = {"bytes_per_device": 10**15, "source": "test", "measured": True, "cuda": False}


def planned_gb(cfg, checkpointing: bool) -> float:
    """The run's plan as it executes here (CPU: float32), in GB per process, without the margin."""
    reference = plan_of(cfg).reference
    return run_plan(cfg, reference.option if reference else "base", checkpointing, Capacity(**UNLIMITED)).total / GB


def test_an_over_capacity_run_is_refused_naming_its_largest_term_and_what_to_change(monkeypatch, tmp_path):
    cfg = compose_run_config([*SHORT_DPO, f"run_dir={tmp_path / 'run'}"])
    largest = run_plan(cfg, "precomputed", False, Capacity(**UNLIMITED)).largest
    monkeypatch.setenv(CAPACITY_ENV, "0.01")
    with pytest.raises(ConfigError) as refused:
        validate(cfg)
    message = str(refused.value)
    assert "does not fit the memory free here" in message and f"{CAPACITY_ENV}=0.01" in message
    assert f"Largest terms: {largest} " in message, message
    assert "model.gradient_checkpointing=true" in message  # the tiny twin's preset trains without it
    assert "launcher.memory_gate=warn" in message and "\n" not in message
    assert not (tmp_path / "run").exists()
    validate(compose_run_config([*SHORT_DPO, "launcher.memory_gate=warn"]))  # warned about, not refused


def test_the_cli_refuses_an_over_capacity_run_before_any_weight_loads(tmp_path):
    """A fresh model cache: the tiny twin is built there on first use, so an empty cache shows nothing was loaded."""
    cache = tmp_path / "cache"
    result = run_cli(*SHORT_DPO, f"run_dir={tmp_path / 'run'}", cwd=tmp_path,
                     env={CAPACITY_ENV: "0.01", "ALIGNMENT_CACHE": str(cache)})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "does not fit the memory free here" in result.stderr and "Largest terms: " in result.stderr
    assert not (tmp_path / "run").exists(), "no run dir, so no summary.json (no status running or trained)"
    assert not [p for p in cache.rglob("*") if p.is_file()], "no twin built, no data prepared"


def test_a_refused_multi_process_run_starts_no_rank(tmp_path):
    """Refused in the launching process: no run dir, so no launch/command.sh, plan.json or rank was written or started;
    on CPU the host's RAM is shared by both processes."""
    result = run_cli(*SHORT_DPO, *TWO_PROCESSES, f"run_dir={tmp_path / 'run'}", cwd=tmp_path, env={CAPACITY_ENV: "0.1"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"50.0 MB per process is free ({CAPACITY_ENV}=0.1, shared by 2 processes)" in result.stderr
    assert "accelerate" not in result.stdout + result.stderr and not (tmp_path / "run").exists()


@pytest.mark.slow  # two ranks train the tiny twin for 3 steps
def test_launched_ranks_use_the_launching_process_measurement(tmp_path, monkeypatch):
    monkeypatch.delenv(CAPACITY_ENV, raising=False)  # measured, as a user's command is
    run_dir = tmp_path / "run"
    result = run_cli(*SHORT_DPO, *TWO_PROCESSES, "model.gradient_checkpointing=auto", f"run_dir={run_dir}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    recorded = json.loads((run_dir / "plan.json").read_text())
    plan = json.loads((run_dir / "summary.json").read_text())["plan"]
    assert plan == recorded  # rank 0 recorded the launcher's plan, not a measurement of its own
    assert plan["memory_gate"]["capacity_source"] == "host RAM available, measured, shared by 2 processes"
    assert plan["gradient_checkpointing"] is False and plan["gradient_checkpointing_reason"].startswith("auto: off")


@pytest.mark.slow  # trains the tiny twin for 3 steps
def test_with_the_warning_setting_an_over_capacity_run_proceeds_and_finishes(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(*SHORT_DPO, "launcher.memory_gate=warn", f"run_dir={run_dir}", cwd=tmp_path,
                     env={CAPACITY_ENV: "0.01"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "does not fit the memory free here" in result.stderr
    assert "launcher.memory_gate=warn: going on" in result.stderr
    assert result.stderr.count("does not fit the memory free here") == 1  # preflight and the runner: one warning
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    gate = summary["plan"]["memory_gate"]
    assert gate["verdict"] == "does not fit" and gate["capacity_bytes_per_device"] == 0.01 * GB
    assert gate["planned_bytes_per_device"] > gate["capacity_bytes_per_device"] and gate["margin"] == MEMORY_MARGIN


def test_the_design_docs_full_fine_tuning_command_is_refused_by_the_cli_without_loading_anything(tmp_path, monkeypatch):
    """`python -m alignment stage=dpo model=qwen72b backend=fsdp` as written (every weight trained) on this CPU machine:
    refused for host RAM, pointing at QLoRA and the preset that uses it. Planned as a run that would download
    (HF_HUB_OFFLINE=0), with the hub endpoint pointed at a closed port and an empty HF cache: any download would
    fail or leave files there."""
    monkeypatch.delenv(CAPACITY_ENV, raising=False)  # measured, as a user's command is
    hf_home = tmp_path / "hf"
    result = run_cli(*QWEN72B_FULL, cwd=tmp_path,
                     env={"HF_HUB_OFFLINE": "0", "HF_HOME": str(hf_home), "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr
    assert "does not fit the memory free here" in error and "host RAM available, measured" in error
    assert "peft=qlora" in error and "experiment=qwen72b_qlora_dpo" in error, error
    assert "Largest terms: optimizer " in error
    assert not (tmp_path / "outputs").exists()
    assert not [p for p in hf_home.rglob("*") if p.is_file()] if hf_home.exists() else True


@pytest.mark.parametrize("processes", range(2, 9))
def test_qwen72b_full_fine_tuning_does_not_fit_on_2_to_8_gpus_of_80_gb(processes, planning):
    """The planner's verdict for the design doc's run on N × 80 GB, even at one sequence per micro batch."""
    cfg = compose_run_config([*QWEN72B_FULL, f"launcher.num_processes={processes}", "launcher.gpu_memory_gb=80",
                              "stage.per_device_train_batch_size=1", "stage.global_batch_size=840", "dry_run=true"])
    validate(cfg)
    gate = plan_of(cfg).memory_gate
    assert gate.verdict == "does not fit" and not gate.measured and gate.capacity_bytes_per_device == 80 * GB
    assert plan_memory(plan_inputs(cfg, "precomputed", checkpointing=True)).fits is False  # without the margin too


def test_the_real_run_measures_the_memory_it_runs_with(monkeypatch):
    monkeypatch.delenv(CAPACITY_ENV, raising=False)
    cpu = compose_run_config(["backend=ddp", "launcher.num_processes=2"])
    one, two = measured_capacity(compose_run_config([]), cuda=False), measured_capacity(cpu, cuda=False)
    assert one.measured and "host RAM available" in one.source and "shared by 2 processes" in two.source
    assert two.bytes_per_device == pytest.approx(one.bytes_per_device / 2, rel=0.2)  # the host's RAM, halved
    assert plan_of(compose_run_config(["dry_run=true", "stage=dpo"])).memory_gate.capacity_source == \
        "launcher.gpu_memory_gb=80"  # a dry run plans for the configured devices


def auto_config(capacity_gb: float, *overrides: str):
    """The tiny DPO run with checkpointing=auto, planned against `capacity_gb` (configured: a dry run)."""
    return compose_run_config([*SHORT_DPO, "model.gradient_checkpointing=auto", f"launcher.gpu_memory_gb={capacity_gb}",
                               "dry_run=true", *overrides])


def capacity_between(cfg) -> tuple[float, float, float]:
    """(with, without, a capacity in GB where the run fits only with checkpointing), in the configured dtype."""
    reference = plan_of(cfg).reference.option
    configured = Capacity(10**15, "test", measured=False, cuda=True)
    with_it, without = (run_plan(cfg, reference, c, configured).total * (1 + MEMORY_MARGIN) / GB for c in (True, False))
    assert with_it < without
    return with_it, without, (with_it + without) / 2


def test_auto_checkpointing_is_on_only_when_the_run_does_not_fit_without_it_and_the_dry_run_says_why():
    with_it, without, between = capacity_between(auto_config(80))
    on, off = auto_config(between), auto_config(80)
    validate(on)
    validate(off)
    chosen_on, chosen_off = plan_of(on), plan_of(off)
    assert chosen_on.gradient_checkpointing
    assert chosen_on.gradient_checkpointing_reason.startswith("auto: on; without it")
    assert chosen_on.memory_gate.verdict == "fits" and chosen_on.memory_gate.checkpointing
    assert not chosen_off.gradient_checkpointing and "fits without it" in chosen_off.gradient_checkpointing_reason
    text_on, text_off = describe([on]), describe([off])
    assert f"checkpointing on ({chosen_on.gradient_checkpointing_reason})" in text_on
    assert "checkpointing on)" in text_on and "memory gate  admits it" in text_on  # the planner's input is the choice
    assert f"checkpointing off ({chosen_off.gradient_checkpointing_reason})" in text_off
    # Too small even with it: on, and the gate's verdict (shown by the dry run) says it does not fit.
    tight = auto_config(with_it * 0.5)
    validate(tight)
    assert plan_of(tight).gradient_checkpointing and "still too large" in plan_of(tight).gradient_checkpointing_reason
    assert "memory gate  would refuse it" in describe([tight])
    # An explicit setting is kept whatever the capacity.
    kept = auto_config(between, "model.gradient_checkpointing=false")
    validate(kept)
    assert not plan_of(kept).gradient_checkpointing
    assert plan_of(kept).gradient_checkpointing_reason == "model.gradient_checkpointing=false"


@pytest.mark.parametrize("needed", [True, False], ids=["on", "off"])
def test_the_trainer_is_given_the_resolved_choice(tmp_path, needed):
    from alignment.records.rundir import RunDir
    from alignment.stages.common import trainer_arguments

    _, _, between = capacity_between(auto_config(80))
    cfg = auto_config(between if needed else 80)
    validate(cfg)
    assert plan_of(cfg).gradient_checkpointing is needed
    assert trainer_arguments(cfg, RunDir(tmp_path), False)["gradient_checkpointing"] is needed


def test_the_checkpointing_choice_travels_in_plan_json_to_the_ranks():
    plan = plan_of(auto_config(80))
    again = ResolvedPlan.from_dict(json.loads(json.dumps(plan.as_dict())))
    assert again == plan


@pytest.mark.parametrize("value", ["yes", "on", "always"])
def test_a_checkpointing_setting_other_than_true_false_auto_is_refused(value):
    with pytest.raises(ConfigError, match=f"model.gradient_checkpointing={value} is not supported. Valid values: "
                                          "true, false, auto"):
        validate(compose_run_config([f"model.gradient_checkpointing={value}"]))


def test_a_memory_gate_setting_other_than_refuse_or_warn_is_refused():
    with pytest.raises(ConfigError, match="launcher.memory_gate=off is not supported. Valid values: refuse, warn"):
        validate(compose_run_config(["launcher.memory_gate=off"]))


def test_auto_is_the_default_for_a_model_preset_that_does_not_set_it():
    from alignment.config.schema import ModelConfig

    assert ModelConfig.__dataclass_fields__["gradient_checkpointing"].default == "auto"
    assert compose_run_config(["model=qwen72b"]).model.gradient_checkpointing is True  # seed 000 sets it


@pytest.mark.slow  # trains the tiny twin twice for 3 steps
@pytest.mark.parametrize("needed", [True, False], ids=["only-fits-with-it", "fits-without-it"])
def test_auto_checkpointing_in_a_real_run_is_recorded_in_summary_json(tmp_path, monkeypatch, needed):
    """The measured capacity (host RAM, shrunk) decides; summary.json records the choice and the reason."""
    probe = compose_run_config([*SHORT_DPO, "model.gradient_checkpointing=auto"])
    monkeypatch.setenv(CAPACITY_ENV, "1000")
    validate(probe)
    with_it, without = planned_gb(probe, True), planned_gb(probe, False)
    between = (with_it + without) / 2 * (1 + MEMORY_MARGIN)
    monkeypatch.setenv(CAPACITY_ENV, f"{between if needed else 1000:.6f}")
    outcome = train(tmp_path, "dpo", *SHORT_DPO, "model.gradient_checkpointing=auto")
    plan = outcome.summary["plan"]
    assert outcome.summary["status"] == "finished"
    assert plan["gradient_checkpointing"] is needed
    assert plan["gradient_checkpointing_reason"].startswith("auto: on" if needed else "auto: off")
    assert plan["memory_gate"]["verdict"] == "fits" and plan["memory_gate"]["checkpointing"] is needed
    assert json.loads((outcome.run.path / "summary.json").read_text())["plan"] == plan
    assert as_dict(outcome.trainer.run_config)["model"]["gradient_checkpointing"] == "auto"
    assert outcome.trainer.args.gradient_checkpointing is needed
    assert outcome.trainer.model.is_gradient_checkpointing is needed  # what the model actually did
