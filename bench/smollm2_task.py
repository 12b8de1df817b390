"""A preference task on the real SmolLM2-135M-Instruct, CPU: two-digit addition, held-out questions.

    python bench/smollm2_task.py [--steps 30] [--lr 5e-4] [--beta 0.1] [--batch 8] [--sft-steps 0]

(with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled and ALIGNMENT_CACHE pointing at a cache that
holds, or may build, the converted SmolLM2 checkpoint.)

Why not the shipped single-digit task (alignment/fixtures, dataset=tiny_dpo): the pretrained model already
solves it. Its reference-free log-prob accuracy on tiny_ultrafeedback/test_prefs is 0.992 (127 of 128 pairs),
so DPO has nothing to fix and cannot beat it. Two-digit addition it gets wrong often enough: the pretrained
model prefers a dropped or spurious carry (the result off by 10) over the right sum on about a third of the
questions, and the result off by one on about a sixth.

The task (written by `generate()` from SEED into bench/smollm2_data/, ultrafeedback_binarized schema, the
splits train_prefs and test_prefs):
- questions "What is a + b?" with a, b in 10..99; the chosen answer states the sum ("47 + 38 = 85.");
- the rejected answer states a wrong sum of one of three kinds, a third each: a carry error (without a carry
  in the ones the tens get one: +10; with one it is dropped: -10), one too many (+1), one too few (-1). The
  wrong result is above the right one as often as below it, so "larger" or "smaller" is no shortcut;
- test_prefs asks HELD_OUT questions that no training pair asks, each with all three wrong answers.
The rule judge `arithmetic` (alignment/evaluation/judges.py) reads multi-digit sums as well: an answer
scores 1 when it states the asked sum with its right result.

What runs: optionally an SFT link on the chosen answers (--sft-steps > 0; off by default: the pretrained
model is an instruct model and already answers in this form, so DPO starts from it), then DPO with a fresh
LoRA adapter on the pretrained model (ref=auto: the base with the adapter disabled), then the evaluation
(eval.after_training=true judge=rule): held-out implicit-reward accuracy before and after, the
reference-free log-prob accuracy of the start (the pretrained model) and of the DPO model, and 4 sampled
answers per held-out question from each, judged by the arithmetic rule. Prints a markdown table.

Measured (2026-11-30, 2 shared CPU cores, defaults): held-out implicit-reward accuracy 0.500 -> 0.896, log-prob
accuracy 0.812 (pretrained) -> 0.896, judge win rate 0.495 (3 wins, 5 losses, 184 ties): sampled at temperature
1 with 16 new tokens, both models explain instead of stating "a + b = c" (5 and 3 of 192 answers judged right),
so the judge sees ties. The pairs are off-policy for the instruct model; --sft-steps N (SFT on the answer form
first, then DPO from it) is the intended fix, not measured for lack of CPU time. About 80 minutes on a loaded
2-core machine (30 DPO steps 36 min, TRL's own end-of-training evaluation 13 min, the evaluation 31 min).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import random
import sys
import tempfile
from pathlib import Path

from dpo_overhead import timed

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "bench" / "smollm2_data"
SEED = 2024
HELD_OUT = 48          # held-out questions (3 pairs each: 144 held-out pairs)
TRAIN_PAIRS = 1024     # training pairs, every one on a question test_prefs never asks
TRAIN_SFT = 512        # chat rows for the optional SFT link (chosen answers only, training questions only)


def _question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def _answer(a: int, b: int, value: int) -> str:
    return f"{a} + {b} = {value}."


def wrong_results(a: int, b: int) -> dict[str, int]:
    """The three wrong sums: a carry error (dropped when the ones carry, added when they do not), +1 and -1."""
    right = a + b
    carry = (a % 10 + b % 10) >= 10
    return {"carry": right - 10 if carry else right + 10, "plus_one": right + 1, "minus_one": right - 1}


def _row(a: int, b: int, wrong: int, rng: random.Random) -> dict:
    user = {"role": "user", "content": _question(a, b)}
    chosen = [user, {"role": "assistant", "content": _answer(a, b, a + b)}]
    rejected = [user, {"role": "assistant", "content": _answer(a, b, wrong)}]
    return {"prompt": user["content"], "prompt_id": hashlib.sha256(user["content"].encode()).hexdigest(),
            "chosen": chosen, "rejected": rejected, "messages": chosen,
            "score_chosen": 9.0, "score_rejected": float(rng.randint(1, 5))}


def generate(out: Path = DATA, seed: int = SEED) -> Path:
    """train_prefs / test_prefs (ultrafeedback_binarized schema) and train_sft / test_sft (ultrachat_200k)."""
    rng = random.Random(seed)
    questions = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(questions)
    held_out, train = questions[:HELD_OUT], questions[HELD_OUT:]
    train_rows = []
    for a, b in train[:TRAIN_PAIRS]:  # one pair per training question, kinds drawn a third each
        kind = rng.choice(["carry", "plus_one", "minus_one"])
        train_rows.append(_row(a, b, wrong_results(a, b)[kind], rng))
    test_rows = [_row(a, b, wrong, rng) for a, b in held_out for wrong in wrong_results(a, b).values()]
    sft = [{"prompt": _question(a, b), "prompt_id": hashlib.sha256(_question(a, b).encode()).hexdigest(),
            "messages": [{"role": "user", "content": _question(a, b)},
                         {"role": "assistant", "content": _answer(a, b, a + b)}]}
           for a, b in train[TRAIN_PAIRS:TRAIN_PAIRS + TRAIN_SFT + 32]]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train_prefs", train_rows), ("test_prefs", test_rows), ("train_sft", sft[:TRAIN_SFT]),
                       ("test_sft", sft[TRAIN_SFT:])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    asked = {r["prompt"] for r in test_rows}
    assert not asked & {r["prompt"] for r in train_rows} and not asked & {r["prompt"] for r in sft}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sft-steps", type=int, default=0)
    parser.add_argument("--sft-lr", type=float, default=2e-4)
    parser.add_argument("--samples", type=int, default=4, help="sampled answers per held-out question and model")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run dirs under this path")
    args = parser.parse_args()
    data = generate()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TQDM_DISABLE": "1"}
    common = ["model=smollm2_135m", "peft=lora", f"seed=42", "stage.warmup_ratio=0",
              "stage.max_length=96", "stage.max_prompt_length=64", "stage.save_steps=100000"]
    scratch_ctx = tempfile.TemporaryDirectory()
    scratch = args.keep or Path(scratch_ctx.name)
    commands, walls = [], {}
    parent = []
    if args.sft_steps:
        sft = scratch / "sft"
        command = [sys.executable, "-m", "alignment", *common, "stage=sft", "dataset=tiny_sft",
                   f"dataset.path={data}", "dataset.name=smollm2_addition_sft", "stage.packing=false",
                   f"stage.max_steps={args.sft_steps}", f"learning_rate={args.sft_lr}",
                   f"stage.per_device_train_batch_size={args.batch}", f"stage.global_batch_size={args.batch}",
                   "stage.eval_steps=null", f"run_dir={sft}"]
        walls["sft"], _ = timed(command, env)
        commands.append(command)
        parent = [f"parent_run={sft}"]
    dpo = scratch / "dpo"
    command = [sys.executable, "-m", "alignment", *common, "stage=dpo", "dataset=tiny_dpo", f"dataset.path={data}",
               "dataset.name=smollm2_addition", f"stage.max_steps={args.steps}", f"learning_rate={args.lr}",
               f"beta={args.beta}", f"stage.per_device_train_batch_size={args.batch}",
               f"stage.global_batch_size={args.batch}", *parent, "eval.after_training=true", "judge=rule",
               "eval.generation.max_new_tokens=16", "eval.generation.temperature=1.0",
               f"eval.generation.samples_per_prompt={args.samples}", f"eval.generation.num_prompts={HELD_OUT}",
               f"run_dir={dpo}"]
    walls["dpo+eval"], _ = timed(command, env)
    commands.append(command)
    report = json.loads((dpo / "eval" / "report.json").read_text())
    summary = json.loads((dpo / "summary.json").read_text())
    metrics = [json.loads(l) for l in (dpo / "metrics.jsonl").read_text().splitlines()]
    train_logs = [m for m in metrics if "rewards/accuracies" in m and "loss" in m]
    before, after, judge = report["preference"]["before"], report["preference"]["after"], report["judge"]
    print(f"\n# {datetime.date.today()} · {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()} · python bench/smollm2_task.py --steps {args.steps} --lr {args.lr} "
          f"--beta {args.beta} --batch {args.batch} --sft-steps {args.sft_steps}")
    print("| held-out pairs | implicit-reward accuracy before → after | log-prob accuracy start → after | "
          "mean margin after | judge wins / losses / ties | win rate | train loss first → last | DPO steps | wall |")
    print("|---:|---|---|---:|---|---:|---|---:|---|")
    print(f"| {report['preference']['pairs']} | {before['accuracy']:.3f} → **{after['accuracy']:.3f}** | "
          f"{before['logp_accuracy']:.3f} → **{after['logp_accuracy']:.3f}** | {after['margin_mean']:.3f} | "
          f"{judge['wins']} / {judge['losses']} / {judge['ties']} | **{judge['win_rate']:.3f}** | "
          f"{train_logs[0]['loss']:.4f} → {train_logs[-1]['loss']:.4f} | {args.steps} | "
          + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items()) + " |")
    policy_right = baseline_right = 0
    for line in Path(judge["file"]).read_text().splitlines():
        verdict = json.loads(line)
        policy_right += verdict["score_a"] == 1.0
        baseline_right += verdict["score_b"] == 1.0
    print(f"\nsampled answers right: DPO model {policy_right}/{judge['judged']}, reference {baseline_right}/"
          f"{judge['judged']} (temperature 1.0, {args.samples} per question); evaluation "
          f"{report['seconds']:.0f} s ({report['timing']}); reference: {summary.get('reference', {}).get('option')}")
    print("preference details:", json.dumps({"before": before, "after": after}))
    for command in commands:
        print("command:", " ".join(["python", *command[1:]]))


if __name__ == "__main__":
    main()
