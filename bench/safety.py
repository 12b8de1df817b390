"""What the fault safety costs: cache locks and verification, and how fast SIGTERM becomes a checkpoint.

    python bench/safety.py overhead [--repeats 5]
    python bench/safety.py sigterm [--model tiny|100m]

overhead: whole-process time of a tiny DPO run (ref=precomputed, 4 steps, warm shared cache) with the cache's
    locks, manifests and hash verification (as shipped) and without them (alignment.records.cache's lock a no-op, entries
    and derived files trusted when present: the pre-issue behaviour), alternating the two variants in one session.
    Every run is a fresh process, so the hashes are computed on first use in each, as in real runs.
sigterm: a DPO run on the tiny twin or a ~100M-parameter twin (the tiny Qwen2 twin's class at 768 × 12 layers)
    gets SIGTERM mid-step; reported: seconds from the signal to the COMPLETE marker of its checkpoint, and to exit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_DPO = ["stage=dpo", "ref=precomputed", "stage.max_steps=4", "stage.max_length=128", "stage.max_prompt_length=64",
            "stage.per_device_train_batch_size=8", "stage.global_batch_size=8", "stage.eval_steps=null",
            "stage.save_steps=100000"]
TWIN_100M = ["model.architecture.hidden_size=768", "model.architecture.num_hidden_layers=12",
             "model.architecture.intermediate_size=3072", "model.architecture.num_attention_heads=12",
             "model.architecture.num_key_value_heads=12"]

# Run as `python -c BARE <overrides>`: the CLI with the cache's safety switched off.
BARE = """
import contextlib, sys
import alignment.records.cache as cache
cache.entry_lock = lambda entry: contextlib.nullcontext()
cache.entry_problem = lambda entry, hash_files=True: None if (entry / cache.MANIFEST).exists() else "absent"
cache.check_derived = lambda entry: []
cache.list_derived = lambda entry: []
from alignment.__main__ import main
sys.argv = ["alignment", *sys.argv[1:]]
main()
"""


def _run(variant: str, overrides: list[str], env: dict, cwd: Path) -> float:
    head = [sys.executable, "-m", "alignment"] if variant == "safe" else [sys.executable, "-c", BARE]
    started = time.perf_counter()
    result = subprocess.run([*head, *overrides], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{variant} run failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


VERIFY = """
import json, sys, time
from pathlib import Path
from alignment import cache
root = Path(sys.argv[1])
started = time.perf_counter()
entries = [m.parent for m in root.rglob(cache.MANIFEST)]
problems = [cache.entry_problem(e) for e in entries]
for entry in entries:
    with cache.entry_lock(entry):
        cache.check_derived(entry)
seconds = time.perf_counter() - started
size = sum(p.stat().st_size for e in entries for p in e.rglob("*") if p.is_file())
print(json.dumps({"entries": len(entries), "mb": round(size / 1e6, 2), "seconds": round(seconds, 4),
                  "problems": [p for p in problems if p]}))
"""


def overhead(repeats: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="safety-"))
    env = {**os.environ, "ALIGNMENT_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    _run("safe", [*TINY_DPO, f"run_dir={work}/warm"], env, REPO)  # fills the cache (twin, data, tokens, log-probs)
    times: dict[str, list[float]] = {"safe": [], "bare": []}
    for index in range(repeats):
        for variant in ("bare", "safe") if index % 2 else ("safe", "bare"):
            times[variant].append(_run(variant, [*TINY_DPO, f"run_dir={work}/{variant}{index}"], env, REPO))
    safe, bare = statistics.median(times["safe"]), statistics.median(times["bare"])
    # The verification itself, timed alone in a fresh process (hashes on first use): what a run pays at most.
    verify = json.loads(subprocess.run([sys.executable, "-c", VERIFY, str(work / "cache")], cwd=REPO, env=env,
                                       capture_output=True, text=True, check=True).stdout)
    print(json.dumps({"verification_alone": verify, "machine": f"{platform.machine()} {os.cpu_count()} cores", "repeats": repeats,
                      "with_safety_s": round(safe, 2), "without_s": round(bare, 2),
                      "overhead_pct": round(100 * (safe - bare) / bare, 2),
                      "all": {k: [round(v, 2) for v in vs] for k, vs in times.items()}}, indent=1))


def sigterm(model: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="sigterm-"))
    env = {**os.environ, "ALIGNMENT_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    overrides = [*TINY_DPO, "stage.max_steps=50", *(TWIN_100M if model == "100m" else []), f"run_dir={work}/run"]
    process = subprocess.Popen([sys.executable, "-m", "alignment", *overrides], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = work / "run" / "metrics.jsonl"
    while not (metrics.exists() and '"step": 2' in metrics.read_text()):
        if process.poll() is not None:
            raise SystemExit(process.stdout.read()[-3000:])
        time.sleep(0.02)
    signalled = time.time()
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=600)
    exited = time.time()
    summary = json.loads((work / "run" / "summary.json").read_text())
    checkpoint = Path(summary["last_complete_checkpoint"])
    complete = (checkpoint / "COMPLETE").stat().st_mtime
    size = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    print(json.dumps({"model": model, "exit_code": process.returncode, "status": summary["status"],
                      "step": summary["interrupted_at_step"], "checkpoint_mb": round(size / 1e6, 1),
                      "signal_to_checkpoint_s": round(complete - signalled, 2),
                      "signal_to_exit_s": round(exited - signalled, 2)}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("overhead", "sigterm"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", choices=("tiny", "100m"), default="tiny")
    args = parser.parse_args()
    overhead(args.repeats) if args.what == "overhead" else sigterm(args.model)


if __name__ == "__main__":
    main()
