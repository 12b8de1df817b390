"""The product's datasets train end to end from their fixtures, and the data report runs without training."""

from __future__ import annotations

import json

import pytest

from alignment.records.tracking import read_metrics

from .conftest import DATASET_FIXTURES, run_cli


@pytest.mark.slow
@pytest.mark.parametrize("option", DATASET_FIXTURES)
def test_dataset_trains_end_to_end_on_cpu(option, tmp_path):
    stage, path = DATASET_FIXTURES[option]
    run_dir = tmp_path / "run"
    result = run_cli(f"stage={stage}", f"dataset={option}", "model=tiny_qwen2", f"dataset.path={path}",
                     f"run_dir={run_dir}", "stage.global_batch_size=8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert (run_dir / "model" / "model.safetensors").exists()
    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert losses and all(loss == loss for loss in losses)  # finite, trained
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["dataset"] == option and report["lint"]["findings"] == []
    assert report["totals"]["train"]["kept"] > 0


def test_data_report_command_prepares_without_training(tmp_path):
    stage, path = DATASET_FIXTURES["orpo_dpo_mix_40k"]
    run_dir = tmp_path / "report"
    result = run_cli(f"stage={stage}", "dataset=orpo_dpo_mix_40k", f"dataset.path={path}", "data_report=true",
                     f"run_dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data report: orpo_dpo_mix_40k" in result.stdout and "template lint on" in result.stdout
    report = json.loads((run_dir / "data_report.json").read_text())
    assert {(c["role"], c["split"]) for c in report["composition"]} == {("train", "train"),
                                                                        ("eval", "train (held out)")}
    assert set(report["lengths"]["train"]) == {"prompt", "chosen", "rejected"}
    assert {"p50", "p90", "p99", "max"} <= set(report["lengths"]["train"]["prompt"])
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "data_report"
    assert not (run_dir / "model").exists() and not (run_dir / "metrics.jsonl").exists()


@pytest.mark.slow
def test_a_second_run_reuses_prepared_data_and_trl_tokenization(tmp_path):
    """Prepared splits and TRL's tokenized copies live in the fingerprinted cache; run 2 adds nothing to it."""
    stage, path = DATASET_FIXTURES["ultrafeedback_binarized"]
    env = {"ALIGNMENT_CACHE": str(tmp_path / "cache")}

    def run(name):
        result = run_cli(f"stage={stage}", "dataset=ultrafeedback_binarized", f"dataset.path={path}",
                         "stage.max_steps=1", f"run_dir={tmp_path / name}", cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        return result, sorted(p.relative_to(tmp_path) for p in (tmp_path / "cache" / "data").rglob("*.arrow"))

    import pyarrow as pa

    def columns(file):
        with pa.memory_map(str(tmp_path / file)) as source:
            return set(pa.ipc.open_stream(source).schema.names)

    first, files = run("first")
    second, files_again = run("second")
    tokenized = [p for p in files if "prompt_ids" in columns(p)]
    assert tokenized  # TRL's tokenization, cached next to our prepared splits
    assert "prepared splits reused" in second.stdout + second.stderr
    # Run 2 tokenizes nothing: at most TRL's length filter (its closure holds the run's own output_dir, so
    # `datasets` cannot reuse it) writes a new index file per split.
    new = set(files_again) - set(files)
    assert all(columns(p) == {"indices"} for p in new), new
