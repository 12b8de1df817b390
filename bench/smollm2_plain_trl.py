"""The baseline for bench/smollm2_overhead.py: LoRA SFT or LoRA DPO written directly against TRL, no framework.

    python bench/smollm2_plain_trl.py --stage sft|dpo --model <checkpoint dir> --data <jsonl> --output <dir>
        --steps N --batch B --lr LR [--beta 0.1] --max-length L --seed S

The same work as `python -m alignment model=smollm2_135m peft=lora stage=sft|dpo ...` with the settings
bench/smollm2_overhead.py passes to both: the converted SmolLM2 checkpoint dir, the same jsonl rows (chat rows
for SFT, ultrafeedback pairs for DPO, converted as bench/plain_trl_dpo.py does), the framework's LoRA
settings (r 16, alpha 32, dropout 0.05, all-linear), its pad token, linear schedule without warmup, fused
AdamW, float32 on CPU, no evaluation, one final save_model. For DPO the reference is the base with the adapter
disabled, TRL's default for a PEFT model. Prints one JSON line with the per-step losses and the loop's runtime.
"""

from __future__ import annotations

import argparse

from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from plain_trl_dpo import train_and_report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", choices=["sft", "dpo"], required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--pad-token", default="<|endoftext|>")  # alignment/conf/model/smollm2_135m.yaml tokenizer.pad_token
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.pad_token = args.pad_token
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="float32", attn_implementation="sdpa")
    data = load_dataset("json", data_files=args.data, split="train")
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    common = dict(
        output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, max_length=args.max_length, seed=args.seed, data_seed=args.seed,
        lr_scheduler_type="linear", warmup_steps=0.0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch_fused", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        bf16=False, gradient_checkpointing=False, disable_tqdm=True, dataloader_num_workers=0,
    )
    if args.stage == "sft":
        from trl import SFTConfig, SFTTrainer

        data = data.map(lambda row: {"messages": row["messages"]}, remove_columns=data.column_names)
        config = SFTConfig(**common, packing=False, loss_type="nll")
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             peft_config=lora)
    else:
        from trl import DPOConfig, DPOTrainer

        data = data.map(lambda row: {"prompt": row["chosen"][:-1], "chosen": row["chosen"][-1:],
                                     "rejected": row["rejected"][-1:]}, remove_columns=data.column_names)
        config = DPOConfig(**common, beta=args.beta, loss_type=["sigmoid"])
        trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             peft_config=lora)
    train_and_report(trainer, args.output)


if __name__ == "__main__":
    main()
