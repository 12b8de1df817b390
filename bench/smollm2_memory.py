"""Memory planner accuracy on the real SmolLM2-135M-Instruct: predicted versus measured peak memory, CPU.

    python bench/smollm2_memory.py [--steps 2] [--micro-batch 4] [--max-length 256]
                                   [--cases full,lora,full+checkpointing,lora+checkpointing]

(with HF_HUB_OFFLINE=1 and ALIGNMENT_CACHE pointing at the cache that holds the converted SmolLM2 checkpoint;
it is reused, not rebuilt.)

Same approach as bench/planner_accuracy.py, whose measure() runs each case in a fresh process with glibc's
mmap threshold fixed: SFT with packing (every sequence filled to max_length, so the planned sequence length is
the trained one) on the tiny_sft chat data, float32 on CPU, AdamW (fused); the resident set size is sampled
every 2 ms from just before the weights load to the end of training; measured = peak RSS minus that pre-load
baseline. The one change: the plan is made for the dtype that actually trains (float32 on CPU; the preset's
model.dtype is bfloat16, meant for GPUs), the dataset's eval split is off unless --eval-split (with it, TRL
evaluates once after training at the eval micro batch, 8 rows: that pass, which the planner does not model, is
the peak with a 49k vocabulary), and the planner's terms are reported one by one, with the
logits term re-derived from what TRL's SFT loss materialises, to show which term an error comes from.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path

import planner_accuracy

# planner_accuracy.MEASURE with the plan made in the dtype the run trains in (float32 when no CUDA device).
MEASURE = planner_accuracy.MEASURE.replace(
    'plan = plan_memory(plan_inputs(cfg, "base"))',
    'plan = plan_memory(plan_inputs(cfg, "base", dtype=None if cuda else "float32"))')
assert MEASURE != planner_accuracy.MEASURE

# The LM head alone: TRL 1.16's SFT (and DPO) loss runs the head through its chunked log-prob function (tiles of
# at most 4096 tokens x 32768 vocabulary entries, no full logits). Without Triton (CPU) the tiles are folded in
# torch; this measures what that costs, forward and backward, for one micro batch on the real tied head.
HEAD_PROBE = r"""
import gc, json, sys, threading, time
import psutil, torch
from transformers import AutoModelForCausalLM
from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction

weights, tokens = sys.argv[1], int(sys.argv[2])
head = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32).get_output_embeddings().weight
head.requires_grad_(sys.argv[3] == "trainable")
head.data = head.data.clone()                     # resident before the baseline, like the loaded model
hidden = torch.randn(tokens, head.shape[1], requires_grad=True)
labels = torch.randint(0, head.shape[0], (tokens,))
process = psutil.Process(); peak, running = [0], [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], process.memory_info().rss); time.sleep(0.001)
gc.collect(); base = process.memory_info().rss
threading.Thread(target=sample, daemon=True).start()
out = _ChunkedLogProbFunction.apply(hidden, head, None, labels, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0,
                                    ("log_probs", "entropy", "is_top1"))
forward = peak[0] - base; peak[0] = 0
out[0].sum().backward(); time.sleep(0.01); running[0] = False
print(json.dumps({"forward": forward, "backward": peak[0] - base}))
"""


def head_probe(weights: Path, tokens: int, trainable: bool) -> dict:
    import json
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run([sys.executable, "-c", HEAD_PROBE, str(weights), str(tokens),
                          "trainable" if trainable else "frozen"], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--cases", default="full,lora,full+checkpointing,lora+checkpointing")
    parser.add_argument("--eval-split", action="store_true",
                        help="keep tiny_sft's test_sft split: TRL then evaluates once after training, at "
                             "stage.per_device_eval_batch_size (8), a pass the planner does not model")
    args = parser.parse_args()
    cache = Path(os.environ.get("ALIGNMENT_CACHE", Path.home() / ".cache" / "alignment"))
    planner_accuracy.MEASURE = MEASURE  # measure() reads the module's MEASURE when it runs
    common = ["model=smollm2_135m", "stage=sft", "stage.packing=true", f"stage.max_steps={args.steps}",
              "stage.save_steps=100000", f"stage.max_length={args.max_length}",
              f"stage.per_device_train_batch_size={args.micro_batch}",
              f"stage.global_batch_size={args.micro_batch}", "stage.eval_steps=null", "learning_rate=1e-4",
              *([] if args.eval_split else ["dataset.eval_split=null"])]
    cases = {"full": ["peft=none"], "lora": ["peft=lora"],
             "full+checkpointing": ["peft=none", "model.gradient_checkpointing=true"],
             "lora+checkpointing": ["peft=lora", "model.gradient_checkpointing=true"]}
    cases = {name: cases[name] for name in args.cases.split(",")}
    tokens = args.micro_batch * args.max_length
    rows = []
    for name, extra in cases.items():
        row = planner_accuracy.measure([*common, *extra], cache)
        rows.append((name, row))
        print(f"{name}: predicted {row['predicted'] / 1e6:.0f} MB, measured {row['measured'] / 1e6:.0f} MB", flush=True)
    print(f"\n# {datetime.date.today()} · {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()} · python bench/smollm2_memory.py --steps {args.steps} --micro-batch "
          f"{args.micro_batch} --max-length {args.max_length}{' --eval-split' if args.eval_split else ''} · SmolLM2-135M-Instruct, float32, SFT packed "
          f"({tokens} tokens per micro batch)")
    print("| case | params | predicted | measured | error (pred/meas − 1) | largest planned terms |")
    print("|---|---|---|---|---|---|")
    for name, row in rows:
        error = row["predicted"] / row["measured"] - 1
        top = sorted(row["terms"].items(), key=lambda kv: kv[1], reverse=True)[:4]
        terms = ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in top)
        print(f"| {name} ({row['device']}) | {row['params'] / 1e6:.1f}M | {row['predicted'] / 1e6:.0f} MB | "
              f"{row['measured'] / 1e6:.0f} MB | {error:+.1%} | {terms} |")
    print("\nall planned terms (MB):")
    for name, row in rows:
        print(f"  {name}: " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in row["terms"].items() if v))
    logit_copy = tokens * 49152 * 4
    print(f"\none float32 copy of the logits for {tokens} tokens × 49,152 vocabulary: {logit_copy / 1e6:.0f} MB "
          f"(the planner counts 8 bytes per entry for SFT: {2 * logit_copy / 1e6:.0f} MB)"
          + (f"; the evaluation pass after training holds 8 × {args.max_length} tokens: "
             f"{8 * args.max_length * 49152 * 4 / 1e6:.0f} MB per logit copy" if args.eval_split else ""))
    for name, row in rows:
        gap = row["measured"] - row["predicted"]
        print(f"  {name}: measured − predicted = {gap / 1e6:+.0f} MB = {gap / logit_copy:+.2f} logit copies")
    from smollm2_overhead import smollm2_dir

    head_tokens = args.micro_batch * (args.max_length - 1)  # the loss scores every position but the last
    for trainable in (False, True):
        probe = head_probe(smollm2_dir(), head_tokens, trainable)
        print(f"LM head alone ({'trainable, full FT' if trainable else 'frozen, LoRA'}), {head_tokens} tokens: peak "
              f"forward {probe['forward'] / 1e6:.0f} MB, backward {probe['backward'] / 1e6:.0f} MB = "
              f"{probe['backward'] / (head_tokens * 49152):.1f} bytes per token × vocabulary entry "
              f"(planned: {2 * logit_copy / 1e6:.0f} MB, 8 bytes)")


if __name__ == "__main__":
    main()
