"""The launch plan without a cluster: generated configs, commands and SLURM environment handling."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from alignment.launch.backends import accelerate_config, deepspeed_config
from alignment.preflight.compose import CONF_DIR, compose_run_config
from alignment.errors import ConfigError
from alignment.plan.processes import first_slurm_host, is_secondary_machine, machine, resolve_launcher
from alignment.launch.launcher import launch_command, rank_overrides, slurm_run_path

from .conftest import REPO, run_cli

SLURM_NODE_1 = {"SLURM_JOB_ID": "777", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[003-004]"}


def test_zero3_json_carries_seed_000_settings_and_leaves_per_stage_numbers_to_the_trainer():
    cfg = compose_run_config(["backend=zero3", "stage=dpo"])
    ds = deepspeed_config(cfg)
    zero = ds["zero_optimization"]
    assert zero == {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 104857600,
                    "stage3_prefetch_bucket_size": 104857600, "stage3_param_persistence_threshold": 1048576,
                    "stage3_gather_16bit_weights_on_model_save": True}
    assert ds["steps_per_print"] == 10
    # Batch, accumulation, clipping and precision are the trainer's (from alignment/plan/batch.py): one source.
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                "gradient_clipping"):
        assert ds[key] == "auto"
    offloaded = deepspeed_config(compose_run_config(["backend=zero3", "backend.zero3.offload_optimizer=cpu"]))
    assert offloaded["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    config = accelerate_config(cfg, Path("/run/launch/deepspeed.json"))
    assert config["distributed_type"] == "DEEPSPEED" and "mixed_precision" not in config  # accelerate refuses both
    assert config["deepspeed_config"]["deepspeed_config_file"] == "/run/launch/deepspeed.json"


@pytest.mark.parametrize("model, layer", [("tiny_qwen2", "Qwen2DecoderLayer"), ("mistral7b", "MistralDecoderLayer")])
def test_fsdp_wraps_the_models_decoder_layer_with_fsdp2(model, layer):
    config = accelerate_config(compose_run_config(["backend=fsdp", f"model={model}"]), Path("unused"))
    fsdp = config["fsdp_config"]
    assert config["distributed_type"] == "FSDP" and fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == layer
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT" and fsdp["fsdp_cpu_ram_efficient_loading"] is True


def test_num_processes_defaults_from_the_devices():
    assert resolve_launcher(compose_run_config([])).launcher.num_processes == 1
    assert resolve_launcher(compose_run_config(["backend=ddp"])).launcher.num_processes == 2  # CPU: two
    assert resolve_launcher(compose_run_config(["backend=ddp", "launcher.num_processes=4"])).launcher.num_processes == 4


def test_global_batch_is_kept_when_the_process_count_changes():
    from alignment.plan.batch import batch_plan

    cfg = compose_run_config(["stage=dpo", "stage.per_device_train_batch_size=2"])
    plans = {n: batch_plan(cfg, n) for n in (1, 2, 8, 16)}
    assert {plan.global_batch for plan in plans.values()} == {32}
    assert [plans[n].accumulation for n in (1, 2, 8, 16)] == [16, 8, 2, 1]
    with pytest.raises(ConfigError, match="Nearest valid settings: stage.global_batch_size=0|stage.global_batch_size=64"):
        batch_plan(cfg, 32)


def test_rank_overrides_fix_the_run_dir_and_process_count_for_every_rank(tmp_path):
    cfg = resolve_launcher(compose_run_config(["backend=fsdp", f"run_dir={tmp_path}"]))
    overrides = rank_overrides(["backend=fsdp", "run_dir=elsewhere", "beta=0.2", "dry_run=true"], cfg)
    assert overrides == ["backend=fsdp", "beta=0.2", f"run_dir='{tmp_path}'", "launcher.num_processes=2"]
    command = launch_command(cfg, ["backend=fsdp"], machine(cfg))
    assert command[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[command.index("-m", 3):][:2] == ["-m", "alignment"]


def test_slurm_environment_gives_machine_rank_address_and_a_shared_run_dir():
    assert first_slurm_host("gpu[003-005,9],cpu1") == "gpu003"
    assert first_slurm_host("node7") == "node7"
    cfg = compose_run_config(["backend=fsdp", "launcher.num_machines=2", "launcher.num_processes=16"])
    where = machine(cfg, SLURM_NODE_1)
    assert (where.num_machines, where.machine_rank, where.main_process_ip, where.main_process_port) == (2, 1, "gpu003", 29500)
    assert is_secondary_machine(cfg, SLURM_NODE_1) and not is_secondary_machine(cfg, {**SLURM_NODE_1, "SLURM_NODEID": "0"})
    assert slurm_run_path(cfg, "dpo-tiny_qwen2", SLURM_NODE_1) == Path("outputs/slurm/777_dpo-tiny_qwen2")
    with pytest.raises(ConfigError, match="SLURM gave this job 2 nodes"):
        machine(compose_run_config(["backend=fsdp", "launcher.num_machines=4", "launcher.num_processes=16"]),
                SLURM_NODE_1)
    with pytest.raises(ConfigError, match="run under SLURM"):
        machine(cfg, {})


def _fake_tool(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.slow  # a CLI dry run (~5 s); the fast tier keeps one of each kind
def test_sbatch_script_runs_one_launching_process_per_node_with_slurms_rank_and_address(tmp_path, planning):
    """launchers/slurm.sbatch under fake srun/scontrol on node 1 of a 2-node job; dry_run shows the launch."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_tool(bin_dir, "scontrol", 'echo gpu003; echo gpu004')
    # srun on one node: drop srun's own flags, run the task here.
    _fake_tool(bin_dir, "srun", 'while [ "${1#--}" != "$1" ]; do shift; done; exec "$@"')
    env = {**os.environ, **planning, **SLURM_NODE_1, "SLURM_GPUS_ON_NODE": "8",
           "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(REPO / "launchers" / "slurm.sbatch"), "stage=dpo", "backend=fsdp",
                             "model=qwen72b", "peft=qlora", "stage.per_device_train_batch_size=2", "dry_run=true"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    launch = result.stdout.split("== launch ==", 1)[1]
    for expected in ("--num_processes 16", "--num_machines 2", "--machine_rank 1", "--main_process_ip gpu003",
                     "--main_process_port 29500", "outputs/slurm/777_dpo-qwen72b", "-m alignment"):
        assert expected in launch, (expected, launch)
    assert "backend      fsdp on 16 processes over 2 machine(s)" in result.stdout, result.stdout[:1500]


def test_submitit_launcher_sends_each_member_as_one_job_with_one_task_per_node():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "launcher.num_machines=2",
                                           "launcher.num_processes=16"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.nodes == 2 and launcher.tasks_per_node == 1 and launcher.gpus_per_node == 8


@pytest.mark.slow  # a CLI dry run (~5 s); the fast tier keeps one of each kind
def test_dry_run_shows_the_plan_for_the_backend_and_the_launch_command(tmp_path, planning):
    result = run_cli("stage=dpo", "model=qwen72b", "backend=fsdp", "peft=qlora", "launcher.num_processes=2",
                     "stage.per_device_train_batch_size=1", "dry_run=true", cwd=tmp_path, env=planning)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "memory plan per device (2 × 80 GB, backend fsdp" in out
    assert "global batch 32 = micro batch 1 × accumulation 16 × 2 processes" in out
    command = out.split("== launch ==", 1)[1].split("\n")[1]
    assert "-m accelerate.commands.launch" in command and "--num_processes 2" in command
    assert " dry_run=" not in command, "the ranks would otherwise only plan"
    assert not (tmp_path / "outputs").exists(), "a dry run writes nothing"


def _sbatch_with_fake_slurm(tmp_path: Path, srun_body: str, env_extra: dict) -> subprocess.Popen:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _fake_tool(bin_dir, "scontrol", f'echo "$@" >> {tmp_path}/scontrol.calls; echo node1')
    _fake_tool(bin_dir, "srun", srun_body)
    env = {**os.environ, "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
           "SLURM_JOB_NODELIST": "node1", "SLURM_GPUS_ON_NODE": "8", **env_extra,
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen(["bash", str(REPO / "launchers" / "slurm.sbatch"), "stage=dpo"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sbatch_requeues_an_interrupted_job_and_a_restarted_job_resumes(tmp_path):
    """Exit 75 (checkpoint written after SIGTERM) → scontrol requeue; SLURM_RESTART_COUNT>0 → resume=true."""
    srun = f'echo "$@" > {tmp_path}/srun.args; env | grep ALIGNMENT_ >> {tmp_path}/srun.args; exit 75'
    first = _sbatch_with_fake_slurm(tmp_path, srun, {})
    _, err = first.communicate(timeout=60)
    assert first.returncode == 75, err
    assert (tmp_path / "scontrol.calls").read_text().splitlines()[-1] == "requeue 4242"
    args = (tmp_path / "srun.args").read_text()
    assert "resume=true" not in args and "ALIGNMENT_RUN_DIR_PER_JOB=1" in args

    again = _sbatch_with_fake_slurm(tmp_path, srun.replace("exit 75", "exit 0"), {"SLURM_RESTART_COUNT": "1"})
    _, err = again.communicate(timeout=60)
    assert again.returncode == 0 and "resuming its run dir" in err
    assert "stage=dpo resume=true" in (tmp_path / "srun.args").read_text()
    assert (tmp_path / "scontrol.calls").read_text().count("requeue") == 1


def test_sbatch_passes_sigterm_to_the_tasks_and_waits_for_their_checkpoint(tmp_path):
    srun = (f'trap \'echo got TERM > {tmp_path}/srun.signal; sleep 1; exit 75\' TERM; '
            f'touch {tmp_path}/srun.started; while true; do sleep 0.1; done')
    job = _sbatch_with_fake_slurm(tmp_path, srun, {})
    deadline = time.monotonic() + 30
    while not (tmp_path / "srun.started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 sends the batch script before the time limit
    _, err = job.communicate(timeout=60)
    assert (tmp_path / "srun.signal").read_text().strip() == "got TERM"
    assert job.returncode == 75 and "requeueing job 4242" in err
    assert (tmp_path / "scontrol.calls").read_text().splitlines()[-1] == "requeue 4242"


def test_a_one_node_sbatch_job_names_its_run_dir_after_the_job():
    cfg = compose_run_config([])
    assert slurm_run_path(cfg, "sft-tiny", {"SLURM_JOB_ID": "9"}) is None
    assert slurm_run_path(cfg, "sft-tiny", {"SLURM_JOB_ID": "9", "ALIGNMENT_RUN_DIR_PER_JOB": "1"}) == \
        Path("outputs/slurm/9_sft-tiny")
