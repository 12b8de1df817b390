"""Start-up cost of a command: this tree versus another commit, measured side by side, alternating.

    python bench/startup.py [--before <commit>] [--repeats 3]

Three commands, each timed from process start to exit (median of the repeats):
  help       `python -m alignment --help`
  dry run    `python -m alignment experiment=qwen72b_qlora_dpo dry_run=true`
  tiny run   `python -m alignment stage=sft stage.max_steps=1` (tiny twin, data cache warm), and its
             command → first optimizer step from summary.json's timing
The other commit is checked out into a temporary git worktree; `python -m alignment` run from a tree's root
imports that tree's package, so both use the same venv and libraries. Also counts the lines each tiny run
printed that did not come from the project (library noise such as DeepSpeed's accelerator line).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {
    "help": ["--help"],
    "dry run": ["experiment=qwen72b_qlora_dpo", "dry_run=true"],
    "tiny run": ["stage=sft", "stage.max_steps=1", "stage.save_steps=100000"],
}
OUR_LINE_PREFIXES = ("sft stage", "data:", "step ", "field", "loss", "grad_norm", "run dir")


def run_once(tree: Path, args: list[str], env: dict) -> tuple[float, float | None, int]:
    """Wall seconds, command → first step (tiny run), lines printed that are not the project's."""
    outputs = Path(tempfile.mkdtemp(prefix="startup-"))
    started = time.perf_counter()
    run_dir = [] if args is COMMANDS["help"] else [f"run_dir={outputs}/run"]
    if args is COMMANDS["dry run"]:  # planned as a run that may download (a dry run is checked as its run)
        env = {**env, "HF_HUB_OFFLINE": "0"}
    result = subprocess.run([sys.executable, "-m", "alignment", *args, *run_dir],
                            cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{tree}: {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    summary = outputs / "run" / "summary.json"
    first_step = json.loads(summary.read_text())["timing"]["command_to_first_step_s"] if summary.exists() else None
    noise = 0
    if args is COMMANDS["tiny run"]:
        noise = sum(1 for line in (result.stdout + result.stderr).splitlines()
                    if line.strip() and not line.strip().startswith(OUR_LINE_PREFIXES))
    return wall, first_step, noise


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", default="6324628", help="the commit to compare against")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    with tempfile.TemporaryDirectory() as scratch:
        before = Path(scratch) / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before), args.before],
                       check=True, capture_output=True)
        try:
            trees = {"before": before, "after": REPO}
            for tree in trees.values():  # warm: tiny twin, data cache, page cache
                run_once(tree, COMMANDS["tiny run"], env)
            results = {(t, c): [] for t in trees for c in COMMANDS}
            for _ in range(args.repeats):
                for command, argv in COMMANDS.items():
                    for label, tree in trees.items():
                        results[(label, command)].append(run_once(tree, argv, env))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)],
                           capture_output=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}; "
          f"before = {args.before}, after = working tree; median of {args.repeats}")
    print(f"{'command':<10} {'before s':>9} {'after s':>9} {'after/before':>13}")
    for command in COMMANDS:
        b = statistics.median(r[0] for r in results[("before", command)])
        a = statistics.median(r[0] for r in results[("after", command)])
        print(f"{command:<10} {b:>9.2f} {a:>9.2f} {a / b:>13.2f}")
    b = statistics.median(r[1] for r in results[("before", "tiny run")])
    a = statistics.median(r[1] for r in results[("after", "tiny run")])
    print(f"{'→ step 1':<10} {b:>9.2f} {a:>9.2f} {a / b:>13.2f}   (tiny run: command → first optimizer step)")
    print(f"library lines printed by the tiny run: before {results[('before', 'tiny run')][0][2]}, "
          f"after {results[('after', 'tiny run')][0][2]}")


if __name__ == "__main__":
    main()
