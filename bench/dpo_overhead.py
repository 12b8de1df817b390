"""Framework overhead: our DPO stage versus a plain TRL script doing the same work.

    python bench/dpo_overhead.py [--repeats 5] [--steps 40]

Both run as whole processes (imports, data, model load, training, save), alternating, on the same
tiny twin, data, steps and seed; the result is the median wall time of each and their per-step losses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"batch": 16, "lr": 5e-4, "beta": 0.1, "max_length": 256, "seed": 42}


def tiny_model_dir() -> Path:
    from alignment.preflight.compose import compose_run_config
    from alignment.models.tiny import ensure_tiny_model

    cfg = compose_run_config(["stage=dpo", f"seed={SETTINGS['seed']}"])
    return ensure_tiny_model(cfg.model, cfg.seed)


def timed(command: list[str], env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{command[:3]} failed:\n{result.stderr[-3000:]}")
    return elapsed, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    model = tiny_model_dir()
    data = REPO / "alignment" / "fixtures" / "tiny_ultrafeedback" / "train_prefs.jsonl"
    ours, plain, our_losses, plain_losses, loop_ours, loop_plain = [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats + 1):  # the first round warms caches and is not counted
            run_dir = Path(scratch) / f"ours-{repeat}"
            t_ours, _ = timed([sys.executable, "-m", "alignment", "stage=dpo", f"stage.max_steps={args.steps}",
                               f"stage.per_device_train_batch_size={SETTINGS['batch']}",
                               f"stage.global_batch_size={SETTINGS['batch']}",
                               f"learning_rate={SETTINGS['lr']}", f"beta={SETTINGS['beta']}",
                               f"stage.max_length={SETTINGS['max_length']}", "stage.max_prompt_length=128", f"seed={SETTINGS['seed']}",
                               "stage.warmup_ratio=0", "dataset.eval_split=null", "stage.batching=random",  # TRL's order
                               f"run_dir={run_dir}"], env)
            t_plain, out = timed([sys.executable, str(REPO / "bench" / "plain_trl_dpo.py"), "--model", str(model),
                                  "--data", str(data), "--output", str(Path(scratch) / f"plain-{repeat}"),
                                  "--steps", str(args.steps), "--batch", str(SETTINGS["batch"]),
                                  "--lr", str(SETTINGS["lr"]), "--beta", str(SETTINGS["beta"]),
                                  "--max-length", str(SETTINGS["max_length"]), "--seed", str(SETTINGS["seed"])], env)
            if repeat == 0:
                our_losses = [json.loads(l)["loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()
                              if "loss" in json.loads(l)]
                plain_losses = json.loads(out.strip().splitlines()[-1])["losses"]
                continue
            ours.append(t_ours)
            plain.append(t_plain)
            loop_ours.append(json.loads((run_dir / "summary.json").read_text())["train"]["train_runtime"])
            loop_plain.append(json.loads(out.strip().splitlines()[-1])["train_runtime"])
    max_diff = max(abs(a - b) for a, b in zip(our_losses, plain_losses))
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "steps": args.steps,
        "repeats": args.repeats,
        "ours_median_s": round(statistics.median(ours), 3),
        "plain_trl_median_s": round(statistics.median(plain), 3),
        "ratio": round(statistics.median(ours) / statistics.median(plain), 3),
        "training_loop_median_s": {"ours": statistics.median(loop_ours), "plain_trl": statistics.median(loop_plain)},
        "ours_all_s": [round(t, 2) for t in ours],
        "plain_all_s": [round(t, 2) for t in plain],
        "logged_steps": [len(our_losses), len(plain_losses)],
        "max_abs_loss_difference": max_diff,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
