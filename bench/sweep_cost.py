"""Sweep cost: wall time of a 3-member beta sweep versus one run of the same DPO job.

    python bench/sweep_cost.py [--repeats 2] [--steps 40]

Same tiny setup for both: DPO from a short SFT parent (built once, not timed), full fine-tuning, so the
reference is precomputed. Each measurement starts from an empty ALIGNMENT_CACHE, so the single run and the
sweep both pay data preparation and the reference precompute once; the sweep's members then reuse them
and share one process. Without any sharing the sweep would cost about 3.0 × one run; the goal is ≤ 2.4 ×.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from dpo_overhead import timed

DPO = ["stage=dpo", "learning_rate=3e-4", "stage.warmup_ratio=0", "stage.max_length=256",
       "stage.max_prompt_length=128", "stage.global_batch_size=32", "stage.per_device_train_batch_size=32",
       "dataset.eval_split=null", "stage.save_steps=100000"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "ALIGNMENT_CACHE": str(scratch / "parent-cache")}
        parent = scratch / "sft"
        timed([sys.executable, "-m", "alignment", "stage=sft", "stage.max_steps=30", "learning_rate=3e-3",
               "stage.packing=false", "stage.max_length=256", "stage.global_batch_size=16",
               f"run_dir={parent}"], env)
        single, sweep = [], []
        for repeat in range(args.repeats):
            for kind in ("single", "sweep"):
                work = scratch / f"{kind}-{repeat}"
                work.mkdir()
                run_env = {**env, "ALIGNMENT_CACHE": str(work / "cache")}
                common = [*DPO, f"stage.max_steps={args.steps}", f"parent_run={parent}"]
                command = ([sys.executable, "-m", "alignment", *common, "beta=0.1", f"run_dir={work / 'run'}"]
                           if kind == "single" else
                           [sys.executable, "-m", "alignment", "--multirun", *common, "beta=0.05,0.1,0.5",
                            f"hydra.sweep.dir={work / 'sweep'}"])
                (single if kind == "single" else sweep).append(timed(command, run_env)[0])
    report = {"date": time.strftime("%Y-%m-%d"), "steps": args.steps, "repeats": args.repeats,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
              "single_run_s": [round(t, 2) for t in single], "sweep_3_members_s": [round(t, 2) for t in sweep],
              "ratio_of_medians": round(statistics.median(sweep) / statistics.median(single), 2)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
