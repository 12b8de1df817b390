"""Evaluation throughput on the tiny twin: preference pairs/s and generations/s, batched versus one by one.

    python bench/eval_throughput.py [--run <a finished demo chain dir>] [--repeats 3]

Without --run, the demo (`python -m alignment`) runs first into a scratch dir (not timed). The DPO model is
then scored on the 128 held-out pairs of the synthetic task (both responses of each pair: 256 sequences)
and answers the 32 held-out questions 4 times each (128 answers of at most 16 new tokens, sampled at
temperature 1), at several batch sizes. The model and tokenizer are loaded once; the median of the repeats
is reported. Results: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from dpo_overhead import timed


def _measure(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        function()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        chain = args.run
        if chain is None:
            chain = Path(scratch) / "demo"
            timed([sys.executable, "-m", "alignment", f"run_dir={chain}"], {**os.environ, "HF_HUB_OFFLINE": "1"})
        print(json.dumps(benchmark(chain / "2-dpo", args.repeats), indent=1))


def benchmark(run: Path, repeats: int) -> dict:
    import torch

    from alignment.preflight.compose import compose_run_config
    from alignment.data import prepare
    from alignment.evaluation.generation import generate, prompt_set
    from alignment.evaluation.scoring import pair_logps
    from alignment.models.modeling import load_model, load_tokenizer

    settings = ["stage=eval", "stage.max_length=256", "stage.max_prompt_length=128", "eval.generation.max_new_tokens=16",
                "eval.generation.temperature=1.0", "eval.generation.samples_per_prompt=4"]
    cfg = compose_run_config(settings)
    tokenizer = load_tokenizer(run / "model", cfg.model)
    model = load_model(run / "model", cfg)
    pairs = prepare(cfg, tokenizer).eval.to_list()
    prompts = prompt_set(cfg.eval.generation, pairs)
    scoring = {}
    for batch in (1, 16, 64):
        seconds = _measure(lambda: pair_logps(model, tokenizer, pairs, cfg.stage.max_length, batch), repeats)
        scoring[f"batch {batch}"] = round(len(pairs) / seconds, 1)
    generation = {}
    for batch in (1, 16, 64):
        batched = compose_run_config([*settings, f"eval.generation.batch_size={batch}"]).eval.generation
        seconds = _measure(lambda: generate(model, tokenizer, prompts, batched, cfg.seed), repeats)
        generation[f"batch {batch}"] = round(len(prompts) / seconds, 1)
    return {"date": time.strftime("%Y-%m-%d"), "repeats": repeats, "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "pairs": len(pairs), "answers": len(prompts), "pairs_per_second": scoring,
            "generations_per_second": generation}


if __name__ == "__main__":
    main()
