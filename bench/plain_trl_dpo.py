"""The baseline for bench/dpo_overhead.py: DPO written directly against TRL, no framework.

Same tiny model, data, steps and seed as `python -m alignment stage=dpo ...`; prints one JSON line
with the per-step losses so the two can be compared.
"""

from __future__ import annotations

import argparse
import json

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--beta", type=float, required=True)
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    # For bench/padding.py: epochs instead of steps, accumulation, TRL's checkpointing default, prepared rows.
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--prepared", action="store_true", help="rows already hold prompt / chosen / rejected")
    parser.add_argument("--optim", default="adamw_torch_fused")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="float32", attn_implementation="sdpa")
    data = load_dataset("json", data_files=args.data, split="train")
    if not args.prepared:
        data = data.map(lambda row: {"prompt": row["chosen"][:-1], "chosen": row["chosen"][-1:],
                                     "rejected": row["rejected"][-1:]}, remove_columns=data.column_names)
    config = DPOConfig(
        output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, beta=args.beta, max_length=args.max_length, seed=args.seed, data_seed=args.seed,
        lr_scheduler_type="linear", warmup_steps=0.0, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, gradient_checkpointing=args.gradient_checkpointing, disable_tqdm=True,
        dataloader_num_workers=0, num_train_epochs=args.epochs, gradient_accumulation_steps=args.grad_accum,
        optim=args.optim,
    )
    train_and_report(DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer),
                     args.output)


def train_and_report(trainer, output: str) -> None:
    """Train, save the model, and print one JSON line with the per-step losses and the training time."""
    trainer.train()
    trainer.save_model(output + "/model")
    runtime = next(r["train_runtime"] for r in trainer.state.log_history if "train_runtime" in r)
    print(json.dumps({"losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],
                      "train_runtime": runtime}))


if __name__ == "__main__":
    main()
