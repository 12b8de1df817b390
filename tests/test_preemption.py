"""SIGTERM/SIGINT stop a run at a step boundary with a checkpoint; every killed state resumes to the same run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignment.runtime.preemption import EXIT_INTERRUPTED, FAULT_ENV

from .conftest import run_cli

LONG_DPO = ["stage=dpo", "stage.max_steps=12", "stage.save_steps=5", "stage.max_length=128",
            "stage.max_prompt_length=64", "stage.per_device_train_batch_size=8", "stage.global_batch_size=8",
            "stage.eval_steps=null", "learning_rate=1e-3"]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _records(run_dir) if "loss" in r]


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


def _same_weights(a: Path, b: Path) -> bool:
    import torch

    left, right = _weights(a), _weights(b)
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _start(cwd: Path, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "alignment", *overrides], cwd=cwd, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(condition, timeout: float = 300, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(every)


def _logged_step(run_dir: Path, step: int) -> bool:
    try:
        return any(r.get("step", 0) >= step for r in _records(run_dir))
    except (OSError, ValueError):
        return False


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention `text` (the process table, read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = next((line for line in (entry / "status").read_text().splitlines() if line.startswith("State")), "")
            except OSError:
                continue
            if text in command and "zombie" not in state and entry.name != str(os.getpid()):
                found.append(f"{entry.name}: {command[:200]}")
    return found


@pytest.fixture(scope="module")
def straight_dpo(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("straight")
    result = run_cli(*LONG_DPO, f"run_dir={cwd / 'run'}", cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return cwd / "run"


@pytest.mark.slow
def test_a_signal_mid_step_saves_a_checkpoint_and_resume_is_bit_identical(tmp_path, straight_dpo):
    sent = signal.SIGTERM
    run_dir = tmp_path / "run"
    process = _start(tmp_path, *LONG_DPO, f"run_dir={run_dir}")
    _wait_for(lambda: _logged_step(run_dir, 2))
    signalled = time.monotonic()
    process.send_signal(sent)
    output, _ = process.communicate(timeout=120)
    seconds = time.monotonic() - signalled
    assert process.returncode == EXIT_INTERRUPTED, output[-3000:]
    assert "Traceback" not in output and f"alignment: interrupted: stopped by {sent.name}" in output
    summary = _summary(run_dir)
    step = summary["interrupted_at_step"]
    assert summary["status"] == "interrupted" and summary["signal"] == sent.name and 2 <= step < 12
    checkpoint = run_dir / "checkpoints" / f"checkpoint-{step}"
    assert summary["last_complete_checkpoint"] == str(checkpoint) and (checkpoint / "COMPLETE").exists()
    assert seconds < 25, f"{seconds:.1f} s from the signal to exit"
    assert _processes_mentioning(str(run_dir)) == []

    resumed = run_cli(*LONG_DPO, f"run_dir={run_dir}", "resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(run_dir) == _losses(straight_dpo), "each step once, with the uninterrupted run's losses"
    assert _same_weights(run_dir, straight_dpo)
    summary, straight = _summary(run_dir), _summary(straight_dpo)
    assert summary["status"] == "finished" and summary["resumed_from"] == str(checkpoint)
    assert summary["num_tokens"] == straight["num_tokens"] and summary["num_tokens"] > 0
    assert summary["train"]["train_loss"] == pytest.approx(straight["train"]["train_loss"], abs=1e-4)
    assert [s["status"] for s in summary["segments"]] == ["interrupted", "finished"]
    assert summary["diagnostics"]["checked_steps"] == straight["diagnostics"]["checked_steps"]


@pytest.mark.slow
def test_a_signal_while_a_checkpoint_is_written_still_ends_with_a_complete_one(tmp_path, straight_dpo):
    run_dir = tmp_path / "run"
    process = _start(tmp_path, *LONG_DPO, f"run_dir={run_dir}")
    saving = run_dir / "checkpoints" / "checkpoint-5"
    _wait_for(lambda: saving.exists(), every=0.002)  # the trainer has begun writing the step-5 checkpoint
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, output[-3000:]
    summary = _summary(run_dir)
    assert summary["status"] == "interrupted"
    assert (Path(summary["last_complete_checkpoint"]) / "COMPLETE").exists()
    resumed = run_cli(*LONG_DPO, f"run_dir={run_dir}", "resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(run_dir) == _losses(straight_dpo) and _same_weights(run_dir, straight_dpo)


@pytest.mark.slow
def test_ctrl_c_stops_a_sweep_with_a_checkpoint_and_the_same_command_finishes_it(tmp_path):
    sweep = ["--multirun", *LONG_DPO, "stage.max_steps=8", "stage.save_steps=3", "beta=0.1,0.2"]
    process = _start(tmp_path, *sweep)
    _wait_for(lambda: any(_logged_step(d, 2) for d in (tmp_path / "outputs" / "sweeps").glob("*/0")))
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, output[-3000:]
    (member,) = (tmp_path / "outputs" / "sweeps").glob("*/0")
    summary = _summary(member)
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGINT"
    assert (Path(summary["last_complete_checkpoint"]) / "COMPLETE").exists()
    assert not (member.parent / "1").exists(), "the sweep went on after Ctrl-C"

    again = run_cli(*sweep, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "sweep member 0: resuming the unfinished run" in again.stdout + again.stderr
    assert [s for s, _ in _losses(member)] == list(range(1, 9))
    assert _summary(member)["resumed_from"] == summary["last_complete_checkpoint"]
    assert _summary(member.parent / "1")["status"] == "finished"


DDP = [*LONG_DPO, "backend=ddp", "launcher.num_processes=2", "stage.per_device_train_batch_size=4",
       "stage.max_steps=6", "stage.save_steps=3"]


@pytest.mark.slow
def test_sigterm_to_a_two_process_launch_reaches_every_rank_and_resume_is_bit_identical(tmp_path):
    straight = run_cli(*DDP, f"run_dir={tmp_path / 'straight'}", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run_dir = tmp_path / "run"
    process = _start(tmp_path, *DDP, f"run_dir={run_dir}")
    _wait_for(lambda: _logged_step(run_dir, 2))
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=180)
    assert process.returncode == EXIT_INTERRUPTED, output[-4000:]
    summary = _summary(run_dir)
    assert summary["status"] == "interrupted", summary
    assert (Path(summary["last_complete_checkpoint"]) / "COMPLETE").exists()
    time.sleep(1)
    assert _processes_mentioning(str(run_dir)) == [], "a rank outlived its launcher"

    resumed = run_cli(*DDP, f"run_dir={run_dir}", "resume=true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(run_dir) == _losses(tmp_path / "straight")
    assert _same_weights(run_dir, tmp_path / "straight")
    assert _summary(run_dir)["num_tokens"] == _summary(tmp_path / "straight")["num_tokens"]


@pytest.mark.slow
def test_a_launcher_killed_outright_leaves_no_rank_behind(tmp_path):
    run_dir = tmp_path / "run"
    process = _start(tmp_path, *DDP, f"run_dir={run_dir}")
    _wait_for(lambda: _logged_step(run_dir, 1))
    process.kill()  # SIGKILL: nothing in the launching process runs
    process.communicate(timeout=30)
    _wait_for(lambda: _processes_mentioning(str(run_dir)) == [], timeout=60, every=0.5)
    assert _summary(run_dir)["status"] in ("interrupted", "running")


# ----------------------------------------------------------------------------- the signal handler itself

_HANDLER_SCRIPT = """
import os, signal, sys, time
from alignment.runtime.preemption import StopRequest
timed_out = []
request = StopRequest(grace_s=float(sys.argv[1]), on_timeout=timed_out.append).install()
request.in_training_loop = True
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.2)
os.kill(os.getpid(), signal.SIGTERM)   # the same stop delivered twice: counted once
print("still running", request.signal_name, flush=True)
time.sleep(float(sys.argv[2]))
os.kill(os.getpid(), signal.SIGTERM)   # a later second signal: exit at once
time.sleep(60)
print("not reached", flush=True)
"""


def test_a_second_signal_exits_at_once_and_a_duplicate_counts_once():
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", _HANDLER_SCRIPT, "100", "5.5"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == EXIT_INTERRUPTED
    assert "still running SIGTERM" in result.stdout and "not reached" not in result.stdout
    assert time.monotonic() - started < 30


def test_no_checkpoint_within_the_grace_period_exits_anyway():
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", _HANDLER_SCRIPT, "1", "30"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == EXIT_INTERRUPTED
    assert "no checkpoint completed within preemption.grace_s=1.0 s of SIGTERM" in result.stderr
    assert time.monotonic() - started < 20


# ----------------------------------------------------------------------------- the kill matrix

SHORT_CHAIN = ["stage.max_steps=6", "stage.save_steps=3", "eval.max_pairs=16", "eval.generation.samples_per_prompt=1",
               "eval.generation.max_new_tokens=4", "dataset.rows=64"]
# Every boundary between two phases of the demo chain, in the order a run passes them; the run is killed with
# SIGKILL at each in turn and resumed, so the last resume finds work left from every kind of death.
BOUNDARIES = ["chain:created", "sft:created", "sft:data_prepared", "sft:step-4", "metrics_rewrite", "sft:trained",
              "sft:saved", "dpo:created", "dpo:data_prepared", "dpo:step-2", "dpo:trained", "dpo:saved",
              "dpo:evaluating", "dpo:evaluated"]


@pytest.mark.slow
def test_a_chain_killed_at_every_phase_boundary_resumes_to_the_uninterrupted_result(tmp_path):
    straight = run_cli(*SHORT_CHAIN, f"run_dir={tmp_path / 'straight'}", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]

    chain = tmp_path / "chain"
    for number, boundary in enumerate(BOUNDARIES):
        resume = ["resume=true"] if number else []
        killed = run_cli(*SHORT_CHAIN, f"run_dir={chain}", *resume, cwd=tmp_path, env={FAULT_ENV: boundary})
        assert killed.returncode == -signal.SIGKILL, f"{boundary}: {killed.stderr[-3000:]}"
    finished = run_cli(*SHORT_CHAIN, f"run_dir={chain}", "resume=true", cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]

    assert _summary(chain)["status"] == "finished"
    for link in ("1-sft", "2-dpo"):
        assert [s for s, _ in _losses(chain / link)] == list(range(1, 7)), f"{link}: each step logged once"
        assert _losses(chain / link) == _losses(tmp_path / "straight" / link)
        assert _same_weights(chain / link, tmp_path / "straight" / link)
        summary = _summary(chain / link)
        assert summary["status"] == "finished"
        assert summary["num_tokens"] == _summary(tmp_path / "straight" / link)["num_tokens"]
    evaluation = _summary(chain / "2-dpo")["evaluation"]
    assert evaluation["status"] == "finished"
    assert evaluation == _summary(tmp_path / "straight" / "2-dpo")["evaluation"]


class _DiskFullAtSave:
    """A TrainerCallback raising what a full disk raises, while the trainer writes its second checkpoint."""

    def __new__(cls, at_step: int):
        import errno

        from transformers import TrainerCallback

        class DiskFull(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.global_step == at_step:
                    raise OSError(errno.ENOSPC, "No space left on device")

        return DiskFull()


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_previous_checkpoint_resumes(tmp_path, straight_dpo):
    from alignment.preflight.compose import compose_run_config
    from alignment.errors import ConfigError
    from alignment.runner import run_stage

    run_dir = tmp_path / "run"
    overrides = [*LONG_DPO, f"run_dir={run_dir}", "stage.save_total_limit=1"]
    with pytest.raises(ConfigError, match=r"^no space left on the device of .* resume with resume=true") as full:
        run_stage(compose_run_config(overrides), callbacks=[_DiskFullAtSave(10)])
    assert "\n" not in str(full.value)
    summary = _summary(run_dir)
    assert summary["status"] == "failed" and "No space left on device" in summary["error"]
    assert (Path(summary["last_complete_checkpoint"]) / "COMPLETE").exists()
    run_stage(compose_run_config([*overrides, "resume=true"]))
    assert _losses(run_dir) == _losses(straight_dpo) and _same_weights(run_dir, straight_dpo)
