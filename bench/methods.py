"""The preference methods on the synthetic task: DPO, IPO, ORPO, KTO and SimPO from one SFT parent.

    python bench/methods.py [--sft <a finished SFT run dir>] [--methods dpo,ipo,orpo,kto,simpo] [--repeats 1]
    python bench/methods.py --plain <method> --model ... --data ... --output ... (the plain-TRL side, one process)

Runs the demo's SFT link once (or takes --sft), then from that parent each method with the demo's DPO link
settings (60 steps, 64 pairs per step as 2 micro batches of 32, max length 256, prompt budget 128, lr 1e-4 linear,
no warmup; KTO: 128 rows = 64 pairs per step, micro batch 64), each evaluated as the demo does
(eval.after_training=true judge=rule, 4 sampled answers per held-out question at temperature 1, 16 new tokens).

Then the time comparison, the method of bench/dpo_overhead.py: per method, our CLI without evaluation
(eval.after_training=false dataset.eval_split=null) alternating with a plain-TRL script on the same prepared rows
(a copy of our prepared train split), the same SFT model and the same trainer arguments
(alignment/stages/common.py trainer_arguments plus the stage's own); a first round warms caches and gives the
per-step losses compared, the next --repeats rounds are timed (whole process). Prints one JSON line per method.
Results: BENCHMARKS.md, "Preference methods on the synthetic task".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEED = 42
STEPS, PAIRS_PER_STEP, MICRO_PAIRS = 60, 64, 32
LEARNING_RATE = 1e-4

# The demo's SFT link (alignment/conf/experiment/demo.yaml, chain[0]).
SFT_LINK = ["stage=sft", "learning_rate=3.0e-3", "stage.max_steps=400", "stage.packing=false",
            "stage.warmup_ratio=0.05", "stage.max_length=256", "stage.global_batch_size=16",
            "stage.per_device_train_batch_size=8"]
# The demo's DPO link without stage, beta and the evaluation; a linear schedule said explicitly (stage=simpo's
# default is cosine).
TRAIN_LINK = ["stage.warmup_ratio=0.0", "stage.max_length=256",
              "stage.max_prompt_length=128", "stage.lr_scheduler_type=linear", f"seed={SEED}",
              "stage.batching=random"]  # TRL's own batch order, as the plain-TRL scripts use
EVAL_LINK = ["eval.after_training=true", "judge=rule", "eval.generation.max_new_tokens=16",
             "eval.generation.temperature=1.0", "eval.generation.samples_per_prompt=4"]

# method: (our overrides, beta, rows per pair, plain-TRL extras). beta: the demo's for DPO, TRL's/the papers'
# usual value for the others (IPO tau 0.1, ORPO lambda 0.1, KTO 0.1, SimPO 2.0 with gamma 1.6 = 0.8 x beta).
METHODS: dict[str, dict] = {
    "dpo": {"stage": ["stage=dpo"], "beta": 0.5, "rows_per_pair": 1, "settings": "loss sigmoid, beta 0.5"},
    "ipo": {"stage": ["stage=dpo", "stage.loss_type=ipo"], "beta": 0.1, "rows_per_pair": 1,
            "settings": "DPO loss ipo, beta (tau) 0.1"},
    "orpo": {"stage": ["stage=orpo"], "beta": 0.1, "rows_per_pair": 1, "settings": "beta (lambda) 0.1"},
    "kto": {"stage": ["stage=kto"], "beta": 0.1, "rows_per_pair": 2,
            "settings": "beta 0.1, weights 1/1, 128 rows (64 pairs) per step, micro batch 64"},
    "simpo": {"stage": ["stage=simpo", "stage.simpo_gamma=1.6"], "beta": 2.0, "rows_per_pair": 1,
              "settings": "beta 2.0, gamma 1.6, cpo_alpha 0"},
}


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "WANDB_MODE": "disabled"}


def timed(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env(), cwd=REPO)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return elapsed, result.stdout


def batch_overrides(method: str) -> list[str]:
    rows = METHODS[method]["rows_per_pair"]
    return [f"stage.global_batch_size={PAIRS_PER_STEP * rows}", f"stage.per_device_train_batch_size={MICRO_PAIRS * rows}"]


def our_command(method: str, sft: Path, run: Path, lr: float, evaluate: bool) -> list[str]:
    spec = METHODS[method]
    tail = EVAL_LINK if evaluate else ["eval.after_training=false", "dataset.eval_split=null"]
    return [sys.executable, "-m", "alignment", *spec["stage"], f"beta={spec['beta']}", f"learning_rate={lr}",
            f"stage.max_steps={STEPS}", *TRAIN_LINK, *batch_overrides(method), *tail, f"parent_run={sft}", f"run_dir={run}"]


def our_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def prepared_train_split(run: Path) -> Path:
    from alignment.records.cache import cache_root

    fingerprint = json.loads((run / "data_report.json").read_text())["fingerprint"]
    return cache_root() / "data" / fingerprint / "train"


def evaluation_of(run: Path) -> dict:
    report = json.loads((run / "eval" / "report.json").read_text())
    before, after, judge = report["preference"]["before"], report["preference"]["after"], report["judge"]
    return {"reference": report["reference"]["weights"], "accuracy_before": before["accuracy"],
            "accuracy_after": after["accuracy"], "logp_accuracy_before": before["logp_accuracy"],
            "logp_accuracy_after": after["logp_accuracy"], "margin_mean": round(after["margin_mean"], 3),
            "chosen_logp": [round(before["chosen_logp_mean"], 2), round(after["chosen_logp_mean"], 2)],
            "rejected_logp": [round(before["rejected_logp_mean"], 2), round(after["rejected_logp_mean"], 2)],
            "wins": judge["wins"], "losses": judge["losses"], "ties": judge["ties"],
            "win_rate": round(judge["win_rate"], 3)}


def bench_method(method: str, sft: Path, scratch: Path, lr: float, repeats: int) -> dict:
    spec = METHODS[method]
    result: dict = {"method": method, "settings": spec["settings"], "learning_rate": lr}
    run = scratch / f"{method}-eval"
    seconds, _ = timed(our_command(method, sft, run, lr, evaluate=True))
    result.update(evaluation_of(run), eval_run_s=round(seconds, 1))
    summary = json.loads((run / "summary.json").read_text())
    result["reference_option"] = (summary.get("reference") or {}).get("option")
    first_losses = our_losses(run)
    result["loss_first_last"] = [round(first_losses[0], 4), round(first_losses[-1], 4)]

    ours, plain, loop_ours, loop_plain = [], [], [], []
    rows = scratch / f"{method}-rows" / "train"
    for repeat in range(repeats + 1):  # round 0 warms the caches and gives the losses; it is not counted
        run = scratch / f"{method}-ours-{repeat}"
        t_ours, _ = timed(our_command(method, sft, run, lr, evaluate=False))
        if not rows.exists():  # the same prepared rows, copied so that TRL's cache files land beside the copy
            shutil.copytree(prepared_train_split(run), rows)
        t_plain, out = timed([sys.executable, str(Path(__file__).resolve()), "--plain", method,
                              "--model", str(sft / "model"), "--data", str(rows),
                              "--output", str(scratch / f"{method}-plain-{repeat}"), "--lr", str(lr),
                              "--steps", str(STEPS)])
        plain_report = json.loads(out.strip().splitlines()[-1])
        if repeat == 0:
            mine, theirs = our_losses(run), plain_report["losses"]
            result["logged_steps"] = [len(mine), len(theirs)]
            result["max_abs_loss_difference"] = max(abs(a - b) for a, b in zip(mine, theirs))
            continue
        ours.append(t_ours)
        plain.append(t_plain)
        loop_ours.append(json.loads((run / "summary.json").read_text())["train"]["train_runtime"])
        loop_plain.append(plain_report["train_runtime"])
    if not ours:  # --repeats 0: the losses only
        return result
    result.update(ours_s=round(statistics.median(ours), 2), plain_s=round(statistics.median(plain), 2),
                  ratio=round(statistics.median(ours) / statistics.median(plain), 3),
                  loop_ours_s=round(statistics.median(loop_ours), 2), loop_plain_s=round(statistics.median(loop_plain), 2),
                  ours_all_s=[round(t, 2) for t in ours], plain_all_s=[round(t, 2) for t in plain])
    return result


def plain(argv: list[str]) -> None:
    """One method written directly against TRL, no framework: the same settings as our stage passes."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--plain", required=True, choices=sorted(METHODS))
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--lr", type=float, default=LEARNING_RATE)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args(argv)
    method, spec = args.plain, METHODS[args.plain]

    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="float32", attn_implementation="sdpa")
    data = load_from_disk(args.data)
    micro = MICRO_PAIRS * spec["rows_per_pair"]
    common = dict(
        output_dir=args.output, seed=SEED, data_seed=SEED, learning_rate=args.lr, max_steps=args.steps,
        per_device_train_batch_size=micro, gradient_accumulation_steps=PAIRS_PER_STEP // MICRO_PAIRS,
        lr_scheduler_type="linear", warmup_steps=0.0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused",
        max_length=256, logging_steps=1, logging_first_step=True, save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, disable_tqdm=True,
        dataloader_num_workers=0, beta=spec["beta"],
    )
    if method in ("dpo", "ipo"):
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(**common, loss_type=["ipo" if method == "ipo" else "sigmoid"], label_smoothing=0.0,
                           precompute_ref_log_probs=True)  # what our ref=auto picks for full fine-tuning
        trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    elif method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        trainer = ORPOTrainer(model=model, args=ORPOConfig(**common), train_dataset=data, processing_class=tokenizer)
    elif method == "kto":
        from trl import KTOConfig, KTOTrainer
        from trl.data_utils import unpair_preference_dataset

        config = KTOConfig(**common, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0,
                           precompute_ref_log_probs=True)
        trainer = KTOTrainer(model=model, args=config, processing_class=tokenizer,
                             train_dataset=unpair_preference_dataset(data, keep_in_memory=True))
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        config = CPOConfig(**common, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=1.6, label_smoothing=0.0)
        trainer = CPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(args.output + "/model")
    runtime = next(r["train_runtime"] for r in trainer.state.log_history if "train_runtime" in r)
    print(json.dumps({"losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],
                      "train_runtime": runtime}))


def main() -> None:
    global STEPS
    if "--plain" in sys.argv:
        return plain(sys.argv[1:])
    parser = argparse.ArgumentParser()
    parser.add_argument("--sft", type=Path, default=None, help="a finished run of the demo's SFT link")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds per method after the warm-up round")
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                        help="another learning rate for one method (default 1e-4 for all)")
    parser.add_argument("--steps", type=int, default=STEPS, help="steps per method (a smoke test: fewer)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run dirs here instead of a temporary dir")
    args = parser.parse_args()
    STEPS = args.steps
    learning_rates = {m: LEARNING_RATE for m in METHODS}
    learning_rates.update({k: float(v) for k, v in (item.split("=") for item in args.lr)})
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                      f"Python {platform.python_version()}"}), flush=True)
    with tempfile.TemporaryDirectory() as temporary:
        scratch = args.keep or Path(temporary)
        scratch.mkdir(parents=True, exist_ok=True)
        sft = args.sft
        if sft is None:
            sft = scratch / "sft"
            seconds, _ = timed([sys.executable, "-m", "alignment", *SFT_LINK, f"seed={SEED}", f"run_dir={sft}"])
            print(json.dumps({"sft": str(sft), "seconds": round(seconds, 1)}), flush=True)
        for method in args.methods.split(","):
            print(json.dumps(bench_method(method, sft, scratch, learning_rates[method], args.repeats)), flush=True)


if __name__ == "__main__":
    main()
