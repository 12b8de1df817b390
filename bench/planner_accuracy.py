"""Memory planner accuracy: predicted versus measured peak memory of a ~100M-parameter twin.

    python bench/planner_accuracy.py [--steps 4] [--micro-batch 8] [--max-length 512]

The twin is the real Qwen2ForCausalLM class at hidden 768, 12 layers, 12 heads, 4 KV heads, intermediate
3072 (104.6M parameters with its local 1024-token vocabulary), float32 on CPU. SFT with packing fills
every sequence to max_length, so the planner's sequence length is the one trained. Each case runs in a
fresh process: the twin and the prepared data are built first, then the resident set size (RSS) is
sampled every 2 ms from just before the weights load to the end of training; measured = peak RSS minus
that pre-load baseline. On a CUDA machine the same script reports torch.cuda.max_memory_allocated.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TWIN = ["model.architecture.hidden_size=768", "model.architecture.num_hidden_layers=12",
        "model.architecture.num_attention_heads=12", "model.architecture.num_key_value_heads=4",
        "model.architecture.intermediate_size=3072"]

MEASURE = r"""
import gc, json, sys, threading, time
import psutil, torch
from alignment.preflight.compose import compose_run_config
from alignment.plan.memory import parameter_count, plan_inputs, plan_memory
from alignment.records.rundir import RunDir
from alignment.runner import quiet_libraries, run_stage
from alignment.stages.common import prepare_data
from alignment.models.start import resolve_start

quiet_libraries()
overrides, run_dir = json.loads(sys.argv[1]), sys.argv[2]
cfg = compose_run_config([*overrides, f"run_dir={run_dir}/train"])
start = resolve_start(cfg)                                     # builds the twin (not measured)
warm = RunDir(__import__("pathlib").Path(run_dir) / "warm"); warm.path.mkdir(parents=True)
prepare_data(cfg, warm, start.tokenizer)                       # prepares and caches the data (not measured)
cuda = torch.cuda.is_available()
gc.collect()
process = psutil.Process()
baseline, peak, running = process.memory_info().rss, [0], [True]

def sample():
    while running[0]:
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.002)

thread = threading.Thread(target=sample, daemon=True)
thread.start()
run_stage(cfg)
running[0] = False
thread.join()
plan = plan_memory(plan_inputs(cfg, "base"))
measured = torch.cuda.max_memory_allocated() if cuda else peak[0] - baseline
print(json.dumps({"params": parameter_count(cfg.model.architecture), "measured": measured,
                  "predicted": plan.total, "terms": plan.terms, "device": "cuda" if cuda else "cpu"}))
"""


def measure(overrides: list[str], cache: Path) -> dict:
    env = {**os.environ, "ALIGNMENT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TQDM_DISABLE": "1",
           # glibc otherwise raises its mmap threshold as the process runs and keeps freed tensors in the
           # heap, so RSS would measure fragmentation; a fixed threshold returns every freed tensor.
           "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    with tempfile.TemporaryDirectory() as run_dir:
        result = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(overrides), run_dir],
                                capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-4000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--cases", default="full,lora,full+checkpointing")
    args = parser.parse_args()
    common = ["stage=sft", "stage.packing=true", f"stage.max_steps={args.steps}", "stage.save_steps=100000",
              f"stage.max_length={args.max_length}", f"stage.per_device_train_batch_size={args.micro_batch}",
              f"stage.global_batch_size={args.micro_batch}", "stage.eval_steps=null", "learning_rate=1e-4", *TWIN]
    cases = {"full": ["peft=none"], "lora": ["peft=lora"],
             "full+checkpointing": ["peft=none", "model.gradient_checkpointing=true"],
             "lora+checkpointing": ["peft=lora", "model.gradient_checkpointing=true"]}
    cases = {name: cases[name] for name in args.cases.split(",")}
    print(f"# {datetime.date.today()} · {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs · "
          f"python bench/planner_accuracy.py --steps {args.steps} --micro-batch {args.micro_batch} "
          f"--max-length {args.max_length}")
    print("| case | params | predicted | measured | error | largest planned terms |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as cache:
        for name, extra in cases.items():
            row = measure([*common, *extra], Path(cache))
            error = (row["predicted"] - row["measured"]) / row["measured"]
            top = sorted(row["terms"].items(), key=lambda kv: kv[1], reverse=True)[:3]
            terms = ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in top)
            print(f"| {name} ({row['device']}) | {row['params'] / 1e6:.1f}M | {row['predicted'] / 1e6:.0f} MB | "
                  f"{row['measured'] / 1e6:.0f} MB | {error:+.1%} | {terms} |", flush=True)


if __name__ == "__main__":
    main()
