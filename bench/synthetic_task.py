"""The synthetic arithmetic task: held-out preference accuracy and rule-judge win rate over DPO settings.

    python bench/synthetic_task.py [--sft <a finished SFT run dir>]

Runs the demo's SFT link once (or takes --sft), then the demo's DPO link from it for each learning rate and
beta in the grid, each evaluated as the demo does (eval.after_training=true judge=rule, 4 sampled answers
per held-out question at temperature 1). Prints one JSON line per setting: held-out implicit-reward accuracy
before and after, mean held-out margin, the judge's wins, losses, ties and win rate. Results: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import yaml
from dpo_overhead import timed

REPO = Path(__file__).resolve().parents[1]
GRID = [(lr, beta) for lr in (3e-5, 1e-4, 3e-4) for beta in (0.1, 0.5)]


def demo_links() -> tuple[list[str], list[str]]:
    chain = yaml.safe_load((REPO / "alignment" / "conf" / "experiment" / "demo.yaml").read_text())["chain"]
    return chain[0], chain[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sft", type=Path, default=None)
    args = parser.parse_args()
    sft_link, dpo_link = demo_links()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as scratch:
        sft = args.sft
        if sft is None:
            sft = Path(scratch) / "sft"
            timed([sys.executable, "-m", "alignment", *sft_link, f"run_dir={sft}"], env)
        for lr, beta in GRID:
            run = Path(scratch) / f"dpo-{lr}-{beta}"
            overrides = [o for o in dpo_link if not o.startswith(("learning_rate=", "beta="))]
            timed([sys.executable, "-m", "alignment", *overrides, f"learning_rate={lr}", f"beta={beta}",
                   f"parent_run={sft}", f"run_dir={run}"], env)
            report = json.loads((run / "eval" / "report.json").read_text())
            after, judge = report["preference"]["after"], report["judge"]
            print(json.dumps({"learning_rate": lr, "beta": beta,
                              "accuracy_before": report["preference"]["before"]["accuracy"],
                              "accuracy_after": after["accuracy"], "margin_mean": round(after["margin_mean"], 3),
                              "wins": judge["wins"], "losses": judge["losses"], "ties": judge["ties"],
                              "win_rate": round(judge["win_rate"], 3)}), flush=True)


if __name__ == "__main__":
    main()
