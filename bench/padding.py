"""DPO on ragged preference data: our batching and reference cache against a plain-TRL script, whole processes.

    python bench/padding.py [--rows 48] [--epochs 2]

Every run trains the same twin on the same prepared rows of the ragged fixture (dataset=ragged_dpo: prompts and
answers from a few tokens to hundreds, chosen and rejected lengths independent) for the same number of epochs,
micro batch 8, accumulation 2, the same optimizer, schedule and seed, as a whole process (imports, data, model load,
training, save). Side by side, one after another in this one invocation:

- plain TRL (bench/plain_trl_dpo.py on our prepared rows): gradient checkpointing off, and on (TRL 1.16's default);
- ours with stage.batching=random (TRL's order) and the cold reference cache: the equal-settings baseline;
- ours with the defaults (length-aware batching), checkpointing off and on; ours with stage.padding_free=true;
- ours with the defaults again, the reference log-probs now cached (a sweep member, a rerun).

"Cold" runs start from a cache without prepared data, tokenization or reference log-probs (the tiny twin is kept).
Full fine-tuning, so ref=auto is `precomputed`: one reference pass over the data, cached, against plain TRL's
reference model forwarded at every step. Prints a table and one JSON line; BENCHMARKS.md has the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TWIN = ["model.architecture.hidden_size=192", "model.architecture.num_hidden_layers=4",
        "model.architecture.num_attention_heads=4", "model.architecture.num_key_value_heads=2",
        "model.architecture.intermediate_size=512"]
SETTINGS = {"micro": 8, "accumulation": 2, "lr": 1e-4, "beta": 0.1, "max_length": 1024, "seed": 42,
            "optim": "adamw_torch"}


def our_overrides(rows: int, epochs: float) -> list[str]:
    s = SETTINGS
    return ["stage=dpo", "dataset=ragged_dpo", f"dataset.rows={rows}", "dataset.eval_split=null", *TWIN,
            "stage.max_steps=-1", f"stage.num_train_epochs={epochs}", f"stage.per_device_train_batch_size={s['micro']}",
            f"stage.global_batch_size={s['micro'] * s['accumulation']}", f"learning_rate={s['lr']}",
            f"beta={s['beta']}", f"stage.max_length={s['max_length']}", "stage.max_prompt_length=512",
            f"seed={s['seed']}", "stage.warmup_ratio=0", "stage.lr_scheduler_type=linear", f"stage.optim={s['optim']}",
            "stage.eval_steps=null", "stage.save_steps=100000"]


def prepared_rows(rows: int, epochs: float, cache: Path, out: Path) -> tuple[Path, Path]:
    """The twin's directory and our prepared train rows as JSON lines, for the plain-TRL script."""
    os.environ["ALIGNMENT_CACHE"] = str(cache)
    from alignment.data import prepare
    from alignment.models.modeling import load_tokenizer
    from alignment.models.start import prepare_start
    from alignment.preflight.compose import compose_run_config

    cfg = compose_run_config(our_overrides(rows, epochs))
    start = prepare_start(cfg)
    data = prepare(cfg, load_tokenizer(start.tokenizer, cfg.model)).train
    path = out / "prepared.jsonl"
    data.select_columns(["prompt", "chosen", "rejected"]).to_json(str(path), lines=True)
    return Path(start.weights), path


def timed(command: list[str], env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--epochs", type=float, default=2.0)
    args = parser.parse_args()
    s = SETTINGS
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        cache = scratch / "cache"
        twin, data = prepared_rows(args.rows, args.epochs, cache, scratch)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "ALIGNMENT_CACHE": str(cache)}

        def plain(checkpointing: bool) -> dict:
            command = [sys.executable, "bench/plain_trl_dpo.py", "--model", str(twin), "--data", str(data),
                       "--prepared", "--output", str(scratch / f"plain-{checkpointing}-{time.time_ns()}"),
                       "--steps", "-1", "--epochs", str(args.epochs), "--batch", str(s["micro"]),
                       "--grad-accum", str(s["accumulation"]), "--lr", str(s["lr"]), "--beta", str(s["beta"]),
                       "--max-length", str(s["max_length"]), "--seed", str(s["seed"]), "--optim", s["optim"]]
            if checkpointing:
                command.append("--gradient-checkpointing")
            seconds, out = timed(command, env)
            report = json.loads(out.strip().splitlines()[-1])
            return {"seconds": seconds, "losses": report["losses"], "train_runtime": report["train_runtime"]}

        def ours(name: str, *extra: str, cold: bool = True) -> dict:
            if cold:  # prepared data, tokenization and reference log-probs computed again; the twin stays
                shutil.rmtree(cache / "data", ignore_errors=True)
            run_dir = scratch / name
            seconds, _ = timed([sys.executable, "-m", "alignment", *our_overrides(args.rows, args.epochs), *extra,
                                f"run_dir={run_dir}"], env)
            summary = json.loads((run_dir / "summary.json").read_text())
            losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                      if '"loss"' in line]
            return {"seconds": seconds, "losses": losses, "train_runtime": summary["train"]["train_runtime"],
                    "padding_efficiency": summary["batching"]["padding_efficiency"],
                    "reference_reused": summary["reference"].get("reused")}

        runs = {
            "plain TRL, checkpointing off": plain(False),
            "ours, batching=random (TRL's order), checkpointing off": ours("random", "stage.batching=random",
                                                                          "model.gradient_checkpointing=false"),
            "ours, defaults (length-aware), checkpointing off": ours("length", "model.gradient_checkpointing=false"),
            "ours, padding_free (TRL's order), checkpointing off": ours(
                "padding_free", "stage.padding_free=true", "stage.batching=random", "model.gradient_checkpointing=false"),
            "plain TRL, checkpointing on (TRL's default)": plain(True),
            "ours, defaults (length-aware), checkpointing on": ours("length-gc", "model.gradient_checkpointing=true"),
            "ours, defaults, reference log-probs cached": ours("warm", "model.gradient_checkpointing=false",
                                                               cold=False),
        }
    base = {False: runs["plain TRL, checkpointing off"]["seconds"],
            True: runs["plain TRL, checkpointing on (TRL's default)"]["seconds"]}
    print(f"DPO, {args.rows} ragged pairs × {args.epochs:g} epochs, micro 8 × accumulation 2; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    print(f"{'run':<58}{'wall s':>8}{'× plain (same ckpt)':>21}{'train s':>9}{'padding eff.':>14}")
    for name, run in runs.items():
        checkpointing = "checkpointing on" in name
        print(f"{name:<58}{run['seconds']:8.1f}{run['seconds'] / base[checkpointing]:21.2f}"
              f"{run['train_runtime']:9.1f}{run.get('padding_efficiency') or float('nan'):14.3f}")
    random_losses = runs["ours, batching=random (TRL's order), checkpointing off"]["losses"]
    plain_losses = runs["plain TRL, checkpointing off"]["losses"]
    padding_free = runs["ours, padding_free (TRL's order), checkpointing off"]["losses"]

    def gap(a: list[float], b: list[float]) -> str:
        return f"max |diff| {max(abs(x - y) for x, y in zip(a, b)):.2e} over {min(len(a), len(b))} steps"

    print(f"per-step losses: ours random vs plain TRL {gap(random_losses, plain_losses)}; padding-free vs ours "
          f"random {gap(padding_free, random_losses)}")
    print(json.dumps({"runs": runs}))


if __name__ == "__main__":
    main()
