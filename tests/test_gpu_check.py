"""bench/gpu_check.py at toy size on CPU (--toy), so that the GPU check keeps running between GPU sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO


@pytest.mark.slow  # five 2-step DPO runs, each its own process: 2-3 minutes on 2 shared cores
def test_gpu_check_toy_runs_and_reports(tmp_path):
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--toy", "--out", str(out),
                             "--work", str(tmp_path / "work")],
                            cwd=REPO, capture_output=True, text=True, env=dict(os.environ), timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert (out / "gpu_check.md").exists()
    rows = {row["name"]: row for row in report["rows"]}
    assert set(rows) >= {"lora_length", "lora_random", "lora_padding_free", "qlora_length", "full_length",
                         "lora_liger", "lora_fa2", "fsdp_qlora", "zero3_qlora"}

    for name in ("lora_length", "lora_random", "lora_padding_free"):
        row = rows[name]
        assert row["status"] == "ok", (name, row["reason"], row["log_tail"])
        assert row["real_tokens_per_second"] > 0
        assert row["planned_bytes"] > 0
        assert 0 < row["padding_efficiency"] <= 1
        assert row["mfu"] is None and row["peak_allocated_bytes"] is None  # CPU: n/a
        assert row["final_loss"] is not None
    # Padding-free rows compute no padding. Every single-process run trains the same rows for one epoch, so only
    # the batching differs (at toy size transformers' length grouping has no mega-batch to sort: no gain asserted).
    assert rows["lora_padding_free"]["padding_efficiency"] == pytest.approx(1.0)
    assert rows["lora_length"]["real_tokens"] == rows["lora_random"]["real_tokens"] == \
        rows["lora_padding_free"]["real_tokens"]

    for row in report["rows"]:
        assert row["status"] in ("ok", "failed", "skipped"), row
        if row["status"] != "ok":
            assert row["reason"], row
    # Never on a CPU: two processes on GPUs, flash-attention 2.
    assert rows["fsdp_qlora"]["status"] == rows["zero3_qlora"]["status"] == "skipped"
    assert "needs 2 GPUs" in rows["fsdp_qlora"]["reason"]
    assert rows["lora_fa2"]["status"] == "skipped"
    assert report["parity"]["reason"]
    markdown = (out / "gpu_check.md").read_text()
    assert "| lora_length | ok |" in markdown
