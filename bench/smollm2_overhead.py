"""Framework overhead on SmolLM2-135M-Instruct: our LoRA SFT and DPO stages versus plain TRL, whole processes.

    python bench/smollm2_overhead.py [--repeats 3] [--steps 8] [--batch 8] [--stages sft,dpo]

(with HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled and ALIGNMENT_CACHE pointing at the cache
that holds the converted SmolLM2 checkpoint.)

bench/dpo_overhead.py's method (its timed() runs each command), on the real model: each measurement is a whole
process (imports, composition, data, model load, training, save), `python -m alignment model=smollm2_135m
peft=lora ...` alternating with bench/smollm2_plain_trl.py on the same converted checkpoint dir, the same jsonl
rows (bench/smollm2_data/, written by bench/smollm2_task.py: chat rows for SFT, preference pairs for DPO), steps,
seed, micro batch, learning rate, max length, LoRA settings, linear schedule without warmup, no evaluation.
A first round warms the caches and is not counted; it also gives the per-step losses that are compared.
The result is the median wall time of each and their ratio, per stage, all measured side by side in one run
(the CPU is shared, so only ratios measured together mean anything).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

from dpo_overhead import timed
from smollm2_task import DATA, generate

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"lr": {"sft": 2e-4, "dpo": 3e-4}, "beta": 0.1, "max_length": 96, "seed": 42}
SPLIT = {"sft": "train_sft", "dpo": "train_prefs"}


def smollm2_dir() -> Path:
    """The converted checkpoint dir our runs load (built on first use, then reused)."""
    from alignment.preflight.compose import compose_run_config
    from alignment.models.start import resolve_start

    return Path(resolve_start(compose_run_config(["model=smollm2_135m", "stage=dpo"])).weights)


def ours_command(stage: str, steps: int, batch: int, run_dir: Path) -> list[str]:
    dataset = ["dataset=tiny_sft", "dataset.name=smollm2_addition_sft", "stage.packing=false"] if stage == "sft" \
        else ["dataset=tiny_dpo", "dataset.name=smollm2_addition", "stage.max_prompt_length=64"]
    return [sys.executable, "-m", "alignment", "model=smollm2_135m", "peft=lora", f"stage={stage}", *dataset,
            f"dataset.path={DATA}", "dataset.eval_split=null", f"stage.max_steps={steps}",
            f"stage.per_device_train_batch_size={batch}", f"stage.global_batch_size={batch}",
            f"learning_rate={SETTINGS['lr'][stage]}", f"beta={SETTINGS['beta']}",
            f"stage.max_length={SETTINGS['max_length']}", f"seed={SETTINGS['seed']}", "stage.warmup_ratio=0",
            "stage.lr_scheduler_type=linear", "stage.save_steps=100000", f"run_dir={run_dir}"]


def plain_command(stage: str, steps: int, batch: int, model: Path, output: Path) -> list[str]:
    return [sys.executable, str(REPO / "bench" / "smollm2_plain_trl.py"), "--stage", stage, "--model", str(model),
            "--data", str(DATA / f"{SPLIT[stage]}.jsonl"), "--output", str(output), "--steps", str(steps),
            "--batch", str(batch), "--lr", str(SETTINGS["lr"][stage]), "--beta", str(SETTINGS["beta"]),
            "--max-length", str(SETTINGS["max_length"]), "--seed", str(SETTINGS["seed"])]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--stages", default="sft,dpo")
    args = parser.parse_args()
    stages = args.stages.split(",")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}
    if not (DATA / "train_prefs.jsonl").exists():
        generate()
    model = smollm2_dir()
    walls = {s: {"ours": [], "plain": []} for s in stages}
    loops = {s: {"ours": [], "plain": []} for s in stages}
    losses = {}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats + 1):  # round 0 warms the caches and is not counted
            for stage in stages:
                run_dir = Path(scratch) / f"ours-{stage}-{repeat}"
                # Alternate which goes first, so neither always follows the other's page-cache footprint.
                order = ("ours", "plain") if repeat % 2 == 0 else ("plain", "ours")
                for who in order:
                    if who == "ours":
                        t, _ = timed(ours_command(stage, args.steps, args.batch, run_dir), env)
                        loop = json.loads((run_dir / "summary.json").read_text())["train"]["train_runtime"]
                    else:
                        t, out = timed(plain_command(stage, args.steps, args.batch, model,
                                                     Path(scratch) / f"plain-{stage}-{repeat}"), env)
                        plain = json.loads(out.strip().splitlines()[-1])
                        loop = plain["train_runtime"]
                    print(f"round {repeat} {stage} {who}: {t:.2f} s (loop {loop:.2f} s)", flush=True)
                    if repeat:
                        walls[stage][who].append(t)
                        loops[stage][who].append(loop)
                if repeat == 0:
                    ours_losses = [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()
                                   if "loss" in json.loads(l)]
                    losses[stage] = (ours_losses, plain["losses"])
    print(f"\n# {datetime.date.today()} · {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()} · python bench/smollm2_overhead.py --repeats {args.repeats} --steps "
          f"{args.steps} --batch {args.batch} · SmolLM2-135M-Instruct, LoRA, float32, max length "
          f"{SETTINGS['max_length']}")
    print("| stage | steps × batch | ours (median s) | plain TRL (median s) | ratio | training loop ours / plain (s) | "
          "max per-step loss difference |")
    print("|---|---|---:|---:|---:|---|---|")
    for stage in stages:
        ours, plain = statistics.median(walls[stage]["ours"]), statistics.median(walls[stage]["plain"])
        our_losses, plain_losses = losses[stage]
        diff = max(abs(a - b) for a, b in zip(our_losses, plain_losses))
        print(f"| {stage} | {args.steps} × {args.batch} | {ours:.2f} | {plain:.2f} | **{ours / plain:.3f}** | "
              f"{statistics.median(loops[stage]['ours']):.2f} / {statistics.median(loops[stage]['plain']):.2f} | "
              f"{diff:.2e} ({len(our_losses)} vs {len(plain_losses)} logged steps) |")
    for stage in stages:
        print(f"raw {stage}: ours " + " ".join(f"{t:.2f}" for t in walls[stage]["ours"]) + "; plain "
              + " ".join(f"{t:.2f}" for t in walls[stage]["plain"]))
        print(f"losses {stage}: ours {losses[stage][0]}\n           plain {losses[stage][1]}")


if __name__ == "__main__":
    main()
