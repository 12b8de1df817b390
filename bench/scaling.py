"""Backend scaling on this machine: tokens/s and launch overhead for single vs 2-process ddp, fsdp, zero3.

    python bench/scaling.py [--steps 40] [--repeats 2] [--twin tiny|small]

Each backend runs the same DPO job as a whole command (`python -m alignment ...`), same global batch (16),
seed and data; 2-process runs use micro batch 8 × 1, the single run micro batch 8 × accumulation 2.
- tokens/s: tokens the trainer processed (TRL's gathered num_tokens) / its train_runtime.
- command → first step: wall time from starting the command to the end of the first optimizer step
  (imports, launch, data, model load, engine set-up, reference precompute).
The median over repeats is reported, after one uncounted warm-up round (DeepSpeed builds its CPU
communication extension on first use).
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

TWINS = {  # small: a 4-layer, 256-wide Qwen2 twin (about 3.6M parameters), enough compute to see scaling
    "tiny": [],
    "small": ["model.architecture.hidden_size=256", "model.architecture.num_hidden_layers=4",
              "model.architecture.intermediate_size=688", "model.architecture.num_attention_heads=8",
              "model.architecture.num_key_value_heads=4"],
}
BACKENDS = {"single": [], "ddp": ["backend=ddp", "launcher.num_processes=2"],
            "fsdp": ["backend=fsdp", "launcher.num_processes=2"],
            "zero3": ["backend=zero3", "launcher.num_processes=2"]}


def run_once(backend: str, twin: str, steps: int, scratch: Path) -> dict:
    run_dir = scratch / f"{backend}-{twin}-{time.time_ns()}"
    command = [sys.executable, "-m", "alignment", "stage=dpo", f"stage.max_steps={steps}", "stage.max_length=256",
               "stage.max_prompt_length=128", "stage.per_device_train_batch_size=8", "stage.global_batch_size=16",
               "learning_rate=5e-4", "stage.warmup_ratio=0", "dataset.eval_split=null", "stage.save_steps=100000",
               f"run_dir={run_dir}", *TWINS[twin], *BACKENDS[backend]]
    started = time.time()
    wall, _ = timed(command, {**os.environ, "HF_HUB_OFFLINE": "1"})
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tokens = records[-1]["num_tokens"]
    return {"wall_s": wall, "tokens_per_s": tokens / summary["train"]["train_runtime"],
            "first_step_s": summary["timing"]["first_step_unix"] - started,
            "engine": summary.get("distributed", {}).get("distributed_type")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--twin", default="tiny,small")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for twin in args.twin.split(","):
            for backend in BACKENDS:
                runs = [run_once(backend, twin, args.steps, Path(scratch)) for _ in range(args.repeats + 1)][1:]
                rows.append({"twin": twin, "backend": backend, "engine": runs[0]["engine"],
                             **{key: round(statistics.median(r[key] for r in runs), 2)
                                for key in ("tokens_per_s", "first_step_s", "wall_s")}})
                print(json.dumps(rows[-1]), flush=True)
    for twin in args.twin.split(","):
        single = next(r for r in rows if r["twin"] == twin and r["backend"] == "single")["tokens_per_s"]
        for row in rows:
            if row["twin"] == twin:
                row["speedup_vs_single"] = round(row["tokens_per_s"] / single, 2)
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "steps": args.steps, "repeats": args.repeats,
                      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
