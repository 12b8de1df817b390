"""What a person sees: on a terminal, bars that log lines never break; in a log file, timed step lines and no bars;
no library noise from stacks a run does not use; tiny numbers that do not read as zero."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from alignment.records.console import duration, number

from .conftest import run_cli

BAR = re.compile(r"\d+%\||\d+/\d+ \[\d\d:\d\d")
STEP_LINE = re.compile(r"step \d+/\d+ ")
DPO = ["stage=dpo", "stage.max_steps=3", "stage.logging_steps=1", "stage.max_length=128", "stage.max_prompt_length=64",
       "stage.global_batch_size=8", "stage.per_device_train_batch_size=8", "eval.after_training=true",
       "eval.max_pairs=16", "judge=rule", "eval.generation.num_prompts=2", "eval.generation.max_new_tokens=4"]


def visible_lines(raw: str) -> list[str]:
    """The lines a terminal ends up showing: '\\r' returns to column 0, later characters overwrite earlier ones."""
    raw = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)  # cursor movements and colours
    lines, line, column = [], [], 0
    for char in raw:
        if char == "\r":
            column = 0
        elif char == "\n":
            lines.append("".join(line).rstrip())
            line, column = [], 0
        else:
            if column < len(line):
                line[column] = char
            else:
                line.append(char)
            column += 1
    return [*lines, "".join(line).rstrip()]


def test_numbers_print_readably():
    assert [number(v) for v in (0.0, -0.0, -3e-6, 1.24e-6, 0.693147, 12.3456, 2500.0, 3, float("nan"))] == \
        ["0", "0", "-3.000e-06", "1.240e-06", "0.6931", "12.3456", "2500.0", "3", "nan"]
    assert duration(59.6) == "1:00" and duration(3725) == "1:02:05"


def test_visible_lines_catch_a_log_line_written_through_a_bar():
    """tqdm leaves the cursor after the bar: a plain print there shares the bar's line, as the check must see."""
    [line, _] = visible_lines(" 50%|██   | 1/2 [00:01<00:01, 1.0s/it]step 1/2 loss=0.69\n")
    assert BAR.search(line) and STEP_LINE.search(line)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("script") is None, reason="needs util-linux `script` for a pseudo-terminal")
def test_on_a_terminal_log_lines_print_above_the_bars(tmp_path):
    """A real pseudo-terminal (util-linux `script`, 120 columns): training, reference precompute and evaluation
    bars are drawn, and no visible line mixes a bar with a log line."""
    command = shlex.join([sys.executable, "-m", "alignment", *DPO, f"run_dir={tmp_path / 'run'}"])
    typescript = tmp_path / "typescript"
    result = subprocess.run(["script", "-qec", f"stty cols 120 rows 40; {command}", str(typescript)],
                            cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, timeout=600,
                            env={**os.environ, "TERM": "xterm"})
    raw = typescript.read_text(encoding="utf-8", errors="replace")
    assert result.returncode == 0 and 'COMMAND_EXIT_CODE="0"' in raw, raw[-3000:]
    lines = visible_lines(typescript.read_bytes().decode("utf-8", errors="replace"))
    steps = [line for line in lines if STEP_LINE.search(line)]
    assert len(steps) >= 4, lines  # 3 training steps and the eval line
    broken = [line for line in lines if BAR.search(line) and STEP_LINE.search(line)]
    assert not broken, broken
    assert all(line.startswith("step ") for line in steps), steps
    for bar in (r"Computing reference log probs", r"scoring 32 sequences", r"generating \d+ answers"):
        assert re.search(bar, raw), bar  # reference precompute and evaluation show progress (evaluation bars then clear)


def test_without_a_terminal_step_lines_carry_elapsed_throughput_and_eta_and_no_library_noise(tmp_path):
    result = run_cli(*DPO, f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    steps = [line for line in output.splitlines() if STEP_LINE.match(line) and "eval_" not in line]
    assert len(steps) == 3, output[-3000:]
    assert all(re.search(r"\[\d+:\d\d elapsed, [\d.e+]+ samples/s, [\d.e+-]+ s/step, ETA \d+:\d\d\]$", s) for s in steps), steps
    assert not BAR.search(output), "no progress bars in a log file"
    for noise in ("Setting accelerator to CPU", "gemm_4bit", "wandb:", "[WARNING]"):
        assert noise not in output, noise
