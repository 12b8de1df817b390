"""Parallel sweep members: a 4-member beta sweep run one after another (the basic launcher) versus two at a time
(hydra/launcher=parallel, one thread each), next to one single run of the same job.

    python bench/parallel_sweep.py [--steps 200] [--betas 0.05,0.1,0.2,0.5] [--at-once 2] [--threads 1]

DPO with ref=precomputed on a tiny Qwen2 twin widened (hidden 256, 4 layers) and trained long enough that training,
not a process's start-up, is most of a member's time: at 30 steps a member trains for about 2.5 s and its own
process start (imports, composition, model load) costs several times that, which the basic launcher pays once for
the whole sweep and the parallel launcher once per member. Each of the three commands starts from an empty
ALIGNMENT_CACHE, so each pays the twin's build, the data preparation and the reference precompute once; the table
counts the reference passes of each sweep (members whose summary.json says they ran the reference forward, and the
processes that logged a reference build in builds.jsonl).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DPO = ["stage=dpo", "ref=precomputed", "learning_rate=3e-4", "stage.warmup_ratio=0", "stage.max_length=256",
       "stage.max_prompt_length=128", "stage.global_batch_size=8", "stage.per_device_train_batch_size=8",
       "dataset.eval_split=null", "stage.save_steps=100000",
       # Wider and deeper than the default twin, so that training, not start-up, is most of a member's time.
       "model.architecture.hidden_size=256", "model.architecture.num_hidden_layers=4",
       "model.architecture.intermediate_size=640"]


def timed(command: list[str], cwd: Path, cache: Path, env: dict | None = None) -> float:
    cwd.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                 "WANDB_MODE": "disabled", "ALIGNMENT_CACHE": str(cache), **(env or {})})
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-3000:]}")
    return seconds


def reference_passes(sweep_root: Path, cache: Path) -> tuple[int, int, list[list[float]]]:
    """(members that ran the reference forward, processes that logged a reference build, each member's losses)."""
    members = sorted((p for p in sweep_root.rglob("summary.json") if p.parent.name.isdigit()),
                     key=lambda p: int(p.parent.name))
    forward = sum(json.loads(p.read_text())["reference"]["forward_batches"] > 0 for p in members)
    builds = [json.loads(line) for line in (cache / "builds.jsonl").read_text().splitlines()]
    builders = {b["pid"] for b in builds if b["kind"] == "reference log-probs"}
    losses = [[json.loads(line)["loss"] for line in (p.parent / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line and '"step"' in line] for p in members]
    return forward, len(builders), losses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--betas", default="0.05,0.1,0.2,0.5")
    parser.add_argument("--at-once", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    common = [*DPO, f"stage.max_steps={args.steps}"]
    members = len(args.betas.split(","))
    alignment = [sys.executable, "-m", "alignment"]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        single = timed([*alignment, *common, f"beta={args.betas.split(',')[0]}"], root / "single", root / "c-single")
        sequential = timed([*alignment, "--multirun", *common, f"beta={args.betas}"], root / "seq", root / "c-seq")
        parallel = timed([*alignment, "--multirun", "hydra/launcher=parallel",
                          f"hydra.launcher.members_in_parallel={args.at_once}",
                          f"hydra.launcher.threads_per_member={args.threads}", *common, f"beta={args.betas}"],
                         root / "par", root / "c-par")
        seq_ref = reference_passes(root / "seq" / "outputs" / "sweeps", root / "c-seq")
        par_ref = reference_passes(root / "par" / "outputs" / "sweeps", root / "c-par")

    print(f"# parallel sweep benchmark, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPU cores, {members} members x {args.steps} steps (hidden 256, 4 layers), ref=precomputed")
    print(f"command: python bench/parallel_sweep.py --steps {args.steps} --betas {args.betas} "
          f"--at-once {args.at_once} --threads {args.threads}")
    print("| run | wall s | / single run | / sequential sweep | reference passes (members, processes) |")
    print("|---|---|---|---|---|")
    print(f"| single run (beta={args.betas.split(',')[0]}) | {single:.1f} | 1.00 | - | 1 |")
    print(f"| sweep, sequential (basic launcher, one process) | {sequential:.1f} | {sequential / single:.2f} | 1.00 | "
          f"{seq_ref[0]}, {seq_ref[1]} |")
    print(f"| sweep, parallel ({args.at_once} at a time, {args.threads} thread each) | {parallel:.1f} | "
          f"{parallel / single:.2f} | {parallel / sequential:.2f} | {par_ref[0]}, {par_ref[1]} |")
    same = all(a == b for a, b in zip(seq_ref[2], par_ref[2]))
    worst = max(abs(x - y) for a, b in zip(seq_ref[2], par_ref[2]) for x, y in zip(a, b))
    print(f"per-step losses, parallel vs sequential: {'identical' if same else f'max abs difference {worst:.3g}'} "
          f"(sequential uses the process's default thread count, parallel members {args.threads})")
    print(f"one reference pass for each whole sweep: {seq_ref[:2] == (1, 1) and par_ref[:2] == (1, 1)}")


if __name__ == "__main__":
    main()
