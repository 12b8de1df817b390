"""Data preparation throughput: first run versus a cached second run, and num_proc 1 versus 2.

    python bench/data_prep.py [--rows 20000] [--repeats 3]

A synthetic preference set in the real ultrafeedback_binarized schema (multi-turn rows, system messages,
non-English text, some over the prompt budget) is prepared with the DPO stage's defaults (max_length
1024, max_prompt_length 512) and the tiny Qwen2 twin's tokenizer. Each measurement is one fresh process
timing `prepare()` alone (imports excluded): cold = empty cache, cached = the same command again.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "fixtures"))

MEASURE = r"""
import json, sys, time
from alignment.preflight.compose import compose_run_config
from alignment.data import prepare
from alignment.models.modeling import load_tokenizer
from alignment.models.start import resolve_start
from alignment.runner import quiet_libraries

quiet_libraries()
cfg = compose_run_config(["stage=dpo", "dataset=ultrafeedback_binarized", f"dataset.path={sys.argv[1]}",
                          f"dataset.num_proc={sys.argv[2]}"])
tokenizer = load_tokenizer(resolve_start(cfg).tokenizer, cfg.model)
start = time.perf_counter()
data = prepare(cfg, tokenizer)
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "train": len(data.train), "summary": data.report["summary"]}))
"""


def write_rows(directory: Path, rows: int) -> None:
    from generate import ultrafeedback_row

    directory.mkdir(parents=True, exist_ok=True)
    for split, count in (("train_prefs", rows), ("test_prefs", max(1, rows // 30))):
        with open(directory / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            offset = 0 if split == "train_prefs" else 10 * rows
            for i in range(count):
                handle.write(json.dumps(ultrafeedback_row(offset + i), ensure_ascii=False) + "\n")


def measure(data_dir: Path, cache: Path, num_proc: int) -> dict:
    env = {**os.environ, "ALIGNMENT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(cache / "hf")}
    result = subprocess.run([sys.executable, "-c", MEASURE, str(data_dir), str(num_proc)], capture_output=True,
                            text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_rows(tmp / "prefs", args.rows)
        rows = args.rows + max(1, args.rows // 30)
        results = {}
        for num_proc in (1, 2):
            cold, cached = [], []
            for repeat in range(args.repeats):
                cache = tmp / f"cache-{num_proc}-{repeat}"
                cold.append(measure(tmp / "prefs", cache, num_proc))
                cached.append(measure(tmp / "prefs", cache, num_proc))
            results[num_proc] = {"cold": statistics.median(r["seconds"] for r in cold),
                                 "cached": statistics.median(r["seconds"] for r in cached),
                                 "summary": cold[0]["summary"]}
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"python {platform.python_version()}; {rows} rows (train + test), median of {args.repeats}")
        print(f"data: {results[1]['summary']}")
        print("| num_proc | first run (s) | rows/s | cached run (s) | rows/s | speed-up |")
        print("|---|---|---|---|---|---|")
        for num_proc, r in results.items():
            print(f"| {num_proc} | {r['cold']:.2f} | {rows / r['cold']:,.0f} | {r['cached']:.3f} | "
                  f"{rows / r['cached']:,.0f} | {r['cold'] / r['cached']:.0f}x |")


if __name__ == "__main__":
    main()
