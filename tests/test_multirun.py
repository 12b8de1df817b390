"""`--multirun` sweeps the short keys: one run dir per member inside one sweep dir."""

from __future__ import annotations

import json

import pytest
import yaml

from .conftest import run_cli

pytestmark = pytest.mark.slow


def test_beta_sweep_makes_one_finished_run_per_member(tmp_path):
    result = run_cli("--multirun", "stage=dpo", "beta=0.05,0.5", "stage.max_steps=2", "dataset.eval_split=null",
                     "stage.global_batch_size=8",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweeps = list((tmp_path / "outputs" / "sweeps").iterdir())
    assert len(sweeps) == 1, "all members share one sweep dir"
    members = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [p.name for p in members] == ["0", "1"]
    betas = [yaml.safe_load((p / "config.yaml").read_text())["beta"] for p in members]
    assert betas == [0.05, 0.5]
    for member in members:
        assert json.loads((member / "summary.json").read_text())["status"] == "finished"
        assert (member / "model" / "config.json").exists()
